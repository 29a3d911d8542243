"""Idempotent sends: a retry with the same client_msg_id returns the original id and stores
nothing new, and ResilientClient uses that so a retried send is never duplicated.

The basic server-side rule (same id twice on one connection, after an ack, per sender) is in
tests/e2e/test_messaging.py; here the reply is really lost on the way, and the client library
does the retrying.
"""

from __future__ import annotations

import socket
import struct
import threading

from chatserver.client import ChatClient, ConnectionLost
from chatserver.protocol import NEED_DATA, Connection, Login, Send, Sent, Welcome
from chatserver.resilient import ResilientClient

from .helpers import PASSWORD, WAIT, RawPeer, fetch_everything, log_has, wait_until

SENT_TYPE = 0x86


class ReplyDropper:
    """A TCP proxy in front of the server that cuts the connection instead of forwarding the
    first ``Sent`` reply: the send was committed, but the client never hears of it."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.dropped: Sent | None = None
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self._sockets += [client, server]
            threading.Thread(target=self._copy, args=(client, server), daemon=True).start()
            threading.Thread(target=self._filter, args=(server, client), daemon=True).start()

    def _copy(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        _cut(src, dst)

    def _filter(self, src: socket.socket, dst: socket.socket) -> None:
        """Forward whole frames from the server; swallow the first Sent and hang up."""
        buffer = b""
        try:
            while data := src.recv(65536):
                buffer += data
                while len(buffer) >= 5:
                    (length,) = struct.unpack(">I", buffer[:4])
                    if len(buffer) < 4 + length:
                        break
                    frame, buffer = buffer[:4 + length], buffer[4 + length:]
                    with self._lock:
                        drop = frame[4] == SENT_TYPE and self.dropped is None
                        if drop:
                            self.dropped = _decode(frame)
                    if drop:
                        _cut(src, dst)
                        return
                    dst.sendall(frame)
        except OSError:
            pass
        _cut(src, dst)

    def close(self) -> None:
        self.listener.close()
        for sock in self._sockets:
            _cut(sock)


def _cut(*socks: socket.socket) -> None:
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


def _decode(frame: bytes):
    codec = Connection(role="client")
    codec.receive_data(frame)
    event = codec.next_event()
    assert event is not NEED_DATA
    return event


def test_send_whose_reply_is_lost_is_retried_once_and_stored_once(start_server):
    server = start_server()
    with server.client() as bob:
        bob.register("bob", PASSWORD)
        bob.logout()
        proxy = ReplyDropper((server.host, server.port))
        alice = ResilientClient(lambda: ChatClient(*proxy.address, timeout=WAIT))
        try:
            alice.register("alice", PASSWORD)
            before = alice.client
            sent = alice.send("bob", "exactly once", client_msg_id="k-1")
            # the first reply was swallowed and the connection cut: the client reconnected,
            # logged in again and repeated the send with the same client_msg_id
            assert isinstance(proxy.dropped, Sent)
            assert alice.client is not before and alice.reconnects == 1
            assert (sent.message_id, sent.duplicate) == (proxy.dropped.message_id, True)
            # later sends are new messages as usual
            after = alice.send("bob", "and the next one")
            assert after.duplicate is False and after.message_id > sent.message_id
        finally:
            alice.close()
            proxy.close()
        bob.login("bob", PASSWORD)
        got = [(m.id, m.body) for m in fetch_everything(bob, ack=False)]
        assert got == [(sent.message_id, "exactly once"), (after.message_id, "and the next one")]


def test_retry_on_a_new_connection_after_the_sender_vanished_mid_send(start_server):
    """A raw client sends and disconnects at once, before any reply: the server still commits
    the send, and a retry from another connection with the same id finds it."""
    server = start_server()
    with server.client() as bob, server.client() as alice:
        bob.register("bob", PASSWORD)
        alice.register("alice", PASSWORD)
        alice.logout()
        with RawPeer(server.host, server.port) as raw:
            raw.hello()
            raw.send(Login(request_id=2, name="alice", password=PASSWORD),
                     Send(request_id=3, to="bob", client_msg_id="gone", body="said and left"))
            raw.abort()  # no reply is ever read
        push = bob.pushes.get(timeout=WAIT)  # the message was stored and pushed
        alice.login("alice", PASSWORD)
        retry = alice.send("bob", "said and left", client_msg_id="gone")
        assert (retry.message_id, retry.duplicate) == (push.message.id, True)
        assert [m.id for m in fetch_everything(bob, ack=False)] == [push.message.id]


def test_resilient_client_keeps_retrying_when_a_reconnect_is_refused(start_server):
    """A server that refuses the reconnect (here server_full; a stopping server's
    shutting_down is the same) is "still down": ResilientClient must back off and try again,
    not give up with retries left."""
    server = start_server("--max-connections", "1")
    squatter: list[RawPeer] = []

    def sleep(_delay: float) -> None:
        sleeps.append(_delay)
        if len(sleeps) == 2:  # before the second reconnect, the slot frees up again
            host, port = squatter[0].sock.getsockname()[:2]
            peer = f"{host}:{port}"
            squatter[0].close()
            wait_until(lambda: log_has(server, f"disconnect {peer}\n"), what="the slot to free")

    sleeps: list[float] = []
    alice = ResilientClient(lambda: server.client(timeout=WAIT), retry_delays=(0.01,) * 5,
                            sleep=sleep)
    try:
        alice.register("alice", PASSWORD)
        # alice's connection is lost, and another client takes the only slot meanwhile
        host, port = alice.client._sock.getsockname()[:2]
        peer = f"{host}:{port}"
        alice.client.close()
        wait_until(lambda: log_has(server, f"disconnect {peer}\n"), what="the slot to free")
        squatter.append(RawPeer(server.host, server.port))
        assert isinstance(squatter[0].hello(), Welcome)

        try:
            sent = alice.send("alice", "note to self", client_msg_id="n1")
        except ConnectionLost as exc:
            raise AssertionError(
                f"ResilientClient gave up after {len(sleeps)} of 5 retries: {exc} "
                "(a ConnectionLost from the reconnect's Hello escapes _reconnect)") from exc
        assert sent.duplicate is False
        assert len(sleeps) >= 2 and alice.reconnects == 1
    finally:
        alice.close()
        for peer in squatter:
            peer.close()
