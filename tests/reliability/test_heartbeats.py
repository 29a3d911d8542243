"""Heartbeats: the server pings a silent connection and closes it after a second silent
interval (half-open TCP); the client answers pings and detects a silent server the same way.

The server's ping/pong exchange itself is in tests/e2e/test_server_lifecycle.py; here the
consequences: a peer that went silent is no longer "online", its messages wait for it, and a
client notices a dead server.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from chatserver.client import ChatClient, ConnectionLost
from chatserver.protocol import (
    NEED_DATA,
    Connection,
    Fetch,
    Hello,
    LoggedIn,
    Ping,
    Register,
    Welcome,
    encode_event,
)

from .helpers import PASSWORD, WAIT, Closed, RawPeer, fetch_everything, wait_until


def test_server_closes_a_logged_in_peer_that_went_silent(start_server):
    server = start_server("--heartbeat-interval", "1", "--send-rate", "0")
    with RawPeer(server.host, server.port) as silent, server.client() as alice:
        assert silent.hello().heartbeat_interval == 1
        assert isinstance(silent.request(Register(request_id=2, name="ghost", password=PASSWORD)),
                          LoggedIn)
        alice.register("alice", PASSWORD)
        assert alice.list_accounts("ghost").accounts[0].online
        # From now on the peer sends nothing at all, not even a Pong (as if its host vanished).
        events = silent.events_until_closed(timeout=WAIT)  # bounded: never asserted on
        assert events and all(isinstance(e, Ping) for e in events), events
        # The server forgot the session: the account is offline, messages are not pushed to it
        # any more, and they wait for its next login.
        wait_until(lambda: not alice.list_accounts("ghost").accounts[0].online,
                   what="the session to be dropped")
        sent = alice.send("ghost", "are you there?")
        assert sent.pushed is False
    with server.client() as ghost:
        assert ghost.login("ghost", PASSWORD).pending == 1
        assert [m.id for m in fetch_everything(ghost, ack=False)] == [sent.message_id]
    assert "no heartbeat from" in server.log


def test_silent_peer_after_hello_is_closed_too(start_server):
    """Anonymous connections cost a slot and two threads: silence ends them as well."""
    server = start_server("--heartbeat-interval", "1")
    with RawPeer(server.host, server.port) as silent:
        silent.hello()
        with pytest.raises(Closed):
            while True:
                assert isinstance(silent.next_event(timeout=WAIT), Ping)


def test_client_answers_pings_and_stays_connected(start_server):
    """A ChatClient that does not ping on its own (heartbeat=0) stays connected across many
    server intervals only because it answers the server's pings."""
    server = start_server("--heartbeat-interval", "1")
    with server.client(heartbeat=0) as client:
        client.register("idle", PASSWORD)
        time.sleep(3.5)  # more than two server intervals of silence from our side
        assert not client.closed
        assert client.fetch().messages == ()


class SilentServer:
    """A fake server: answers Hello with Welcome (and, with ``nudge``, one Ping after it),
    then reads everything and says nothing more."""

    def __init__(self, heartbeat_interval: int = 0, nudge: bool = False):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.heartbeat_interval = heartbeat_interval
        self.nudge = nudge
        self.received: list = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        codec = Connection(role="server")
        conn.settimeout(WAIT * 2)
        try:
            while data := conn.recv(65536):
                codec.receive_data(data)
                while (event := codec.next_event()) is not NEED_DATA:
                    self.received.append(event)
                    if isinstance(event, Hello):
                        conn.sendall(encode_event(Welcome(
                            request_id=event.request_id, version=1, server="silent",
                            max_frame_size=1 << 20, max_message_bytes=65536,
                            heartbeat_interval=self.heartbeat_interval)))
                        if self.nudge:
                            time.sleep(0.2)  # a separate segment, after the Welcome
                            conn.sendall(encode_event(Ping(nonce=77)))
        except OSError:
            pass
        finally:
            conn.close()
            self.listener.close()


GIVE_UP = 5.0  # bound on waiting for a client with a 0.5-1 s heartbeat to give up


def test_client_detects_a_server_that_goes_silent_after_some_traffic():
    fake = SilentServer(nudge=True)
    client = ChatClient(*fake.address, timeout=WAIT * 2, heartbeat=0.5)
    try:
        wait_until(lambda: client.closed, timeout=GIVE_UP, what="the client to give up")
        assert "heartbeat" in client.close_reason
    finally:
        client.close()
    fake.thread.join(WAIT * 2)
    # it answered the server's ping, then pinged the silent server once before giving up
    assert [type(e).__name__ for e in fake.received] == ["Hello", "Pong", "Ping"]


def test_client_detects_a_server_that_stopped_answering():
    """The server answers Hello, then nothing: a pending request must fail with
    ConnectionLost (heartbeat) instead of hanging until the request timeout."""
    fake = SilentServer()
    client = ChatClient(*fake.address, timeout=WAIT * 2, heartbeat=0.5)
    try:
        pending = client.submit(lambda rid: Fetch(request_id=rid, limit=0))
        try:
            pending.result(GIVE_UP)
        except ConnectionLost as exc:
            assert "heartbeat" in str(exc)
        except TimeoutError:
            raise AssertionError(
                "the client never noticed the silent server: its heartbeat timeout is set after "
                "the reader thread is already blocked in a recv() without timeout") from None
        assert client.closed and "heartbeat" in client.close_reason
        with pytest.raises(ConnectionLost):
            client.fetch()
    finally:
        client.close()
    fake.thread.join(WAIT * 2)
    # it did ask before giving up: Hello, the request, then a Ping
    assert [type(e).__name__ for e in fake.received] == ["Hello", "Fetch", "Ping"]


def test_client_follows_the_interval_the_server_states():
    """Without a heartbeat argument the client uses Welcome.heartbeat_interval."""
    fake = SilentServer(heartbeat_interval=1)
    client = ChatClient(*fake.address, timeout=WAIT * 2)
    try:
        wait_until(lambda: client.closed, timeout=GIVE_UP, what="the client to give up on a "
                   "silent server (its heartbeat never armed: see the test above)")
        assert "heartbeat" in client.close_reason
    finally:
        client.close()
    fake.thread.join(WAIT * 2)
    assert [type(e).__name__ for e in fake.received] == ["Hello", "Ping"]
