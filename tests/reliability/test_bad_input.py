"""Bad input against one live server, which stays up and keeps serving a normal client
*throughout*: a probe client sends, fetches, acknowledges and searches in a loop on its own
thread while each kind of abuse runs, and every one of its requests must succeed.

The exact reply to each malformed frame (Error protocol_error with request id 0, then the
close) is checked one case at a time in tests/e2e/test_protocol_errors.py and the codec is
fuzzed in tests/unit/test_codec_properties.py; here the point is that the server as a whole
is unaffected, and that its memory, threads and file descriptors stay bounded.
"""

from __future__ import annotations

import random
import socket
import struct
import threading

import pytest

from chatserver.protocol import (
    Ack,
    DeleteAccount,
    Error,
    Fetch,
    ListAccounts,
    LoggedIn,
    Login,
    Logout,
    Ping,
    Pong,
    Register,
    Send,
    encode_event,
)
from chatserver.protocol.events import CLIENT_EVENTS
from tests.conftest import ServerProcess

from .helpers import (
    BASE_ARGS,
    MIB,
    PASSWORD,
    WAIT,
    MemoryWatch,
    Probe,
    RawPeer,
    fd_count,
    thread_count,
    wait_until,
)

CLIENT_TYPES = {cls.TYPE for cls in CLIENT_EVENTS}


def frame(type_byte: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IB", 1 + len(payload), type_byte) + payload


def str_field(raw: bytes) -> bytes:
    return struct.pack(">H", len(raw)) + raw


def text_field(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("abuse") / "chat.db",
                           [*BASE_ARGS, "--send-rate", "0"]).start()
    yield server
    server.kill()


@pytest.fixture
def probe(server):
    """A normal client served throughout the test; checked at the end."""
    probe = Probe(server.host, server.port, f"probe{random.randrange(10**9)}")
    probe.wait_rounds(2)
    yield probe
    probe.wait_rounds(3)  # still served after the abuse
    probe.stop()
    probe.check()
    assert server.proc.poll() is None
    assert "Traceback" not in server.log


def protocol_error_then_close(peer: RawPeer) -> None:
    events = peer.events_until_closed()
    assert [(type(e), e.code, e.request_id) for e in events] == [(Error, "protocol_error", 0)]


def test_random_bytes(server, probe):
    rng = random.Random(1)
    for i in range(60):
        with RawPeer(server.host, server.port) as peer:
            if i % 2:
                peer.hello()
            peer.send_bytes(rng.randbytes(rng.randint(1, 2000)))
            peer.sock.shutdown(socket.SHUT_WR)
            events = peer.events_until_closed()
            assert events and isinstance(events[-1], Error), events
            assert events[-1].code == "protocol_error"


def test_truncated_frames(server, probe):
    frames = [encode_event(Register(request_id=2, name="trunc", password=PASSWORD)),
              encode_event(Send(request_id=3, to="x", client_msg_id="c", body="b" * 300)),
              encode_event(Ack(request_id=4, message_ids=(1, 2, 3)))]
    for data in frames:
        for cut in sorted({1, 3, 4, 5, len(data) // 2, len(data) - 1}):
            with RawPeer(server.host, server.port) as peer:
                peer.hello()
                peer.send_bytes(data[:cut])
                peer.sock.shutdown(socket.SHUT_WR)  # the frame will never be completed
                protocol_error_then_close(peer)


def test_length_prefix_of_4_gib_is_refused_without_allocating(server, probe):
    """Forty connections announce 4 GiB frames at once and keep sending: each is refused from
    its prefix alone, and the server's memory does not move by anything like a frame."""
    watch = MemoryWatch(server.proc.pid)
    peers = [RawPeer(server.host, server.port) for _ in range(40)]
    try:
        for i, peer in enumerate(peers):
            if i % 2:
                peer.hello()
            peer.send_bytes(b"\xff\xff\xff\xff")
        for peer in peers:
            try:  # more body: the server has already given up (or will read and drop it)
                peer.send_bytes(b"\x06" + b"\0" * 65536)
            except OSError:
                pass
        for peer in peers:  # write side still open: the refusal did not wait for a body
            events = peer.events_until_closed()
            assert events[-1].code == "protocol_error"
    finally:
        for peer in peers:
            peer.close()
    growth = watch.stop()
    assert growth < 32 * MIB, f"RSS grew by {growth / MIB:.1f} MiB"


def test_invalid_utf8(server, probe):
    bad = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"ok\xe2\x82"]
    for i, raw in enumerate(bad):
        with RawPeer(server.host, server.port) as peer:  # in a str field
            peer.hello()
            peer.send_bytes(frame(0x02, struct.pack(">I", 2) + str_field(raw)
                                  + str_field(PASSWORD.encode())))
            protocol_error_then_close(peer)
        with RawPeer(server.host, server.port) as peer:  # in a text field, logged in
            peer.hello()
            name = f"{probe.name}-utf8-{i}"
            peer.send(Register(request_id=2, name=name, password=PASSWORD))
            assert isinstance(peer.reply(), LoggedIn)
            # addressed to the probe: had it been stored, the probe would have seen it
            peer.send_bytes(frame(0x06, struct.pack(">I", 3) + str_field(probe.name.encode())
                                  + str_field(b"") + text_field(b"body " + raw)))
            protocol_error_then_close(peer)


def test_every_unknown_frame_type(server, probe):
    """All 256 type bytes that a client may not send, before and after Hello."""
    for type_byte in range(256):
        if type_byte in CLIENT_TYPES:
            continue
        with RawPeer(server.host, server.port) as peer:
            if type_byte % 2:
                peer.hello()
            peer.send_bytes(frame(type_byte, struct.pack(">I", 7)))
            protocol_error_then_close(peer)


def test_every_operation_before_login_and_before_hello(server, probe):
    requests = [Logout(request_id=2), Send(request_id=3, to=probe.name, body="hi"),
                Fetch(request_id=4), Ack(request_id=5, message_ids=(1,)),
                DeleteAccount(request_id=6, password=PASSWORD)]
    with RawPeer(server.host, server.port) as peer:  # after Hello, anonymous: refused, open
        peer.hello()
        for request in requests:
            reply = peer.request(request)
            assert (type(reply), reply.code, reply.request_id) == (
                Error, "not_logged_in", request.request_id)
        assert peer.request(Ping(nonce=3)) == Pong(nonce=3)
        assert isinstance(peer.request(Login(request_id=9, name=probe.name, password=PASSWORD)),
                          LoggedIn)
    for request in [*requests, Login(request_id=2, name=probe.name, password=PASSWORD),
                    ListAccounts(request_id=2), Ping(nonce=1)]:
        with RawPeer(server.host, server.port) as peer:  # before Hello: a protocol error
            peer.send(request)
            protocol_error_then_close(peer)


def test_huge_pipeline_without_reading_replies(server, probe):
    """200,000 requests written without reading a reply: the server stops reading (pipelined
    sends) or drops the peer (replies over the 4 MiB outbox), its memory stays bounded."""
    for i in range(60):  # make search replies a few KB each
        with RawPeer(server.host, server.port) as peer:
            peer.hello()
            name = f"pipeline-filler-{i:03}-{'n' * 12}"
            peer.request(Register(request_id=2, name=name, password=PASSWORD))
    watch = MemoryWatch(server.proc.pid)
    peer = RawPeer(server.host, server.port, rcvbuf=4096, timeout=WAIT * 3)
    written = 0
    try:
        peer.hello()
        peer.send(Login(request_id=2, name=probe.name, password=PASSWORD))
        batch = b"".join(encode_event(ListAccounts(request_id=3 + i, pattern="pipe*", limit=500))
                         for i in range(1000))
        batch += b"".join(encode_event(Send(request_id=1, to="nobody-here", body="x"))
                          for _ in range(1000))
        try:
            for _ in range(100):
                peer.send_bytes(batch)
                written += 2000
        except OSError:  # reset: the server dropped us
            pass
        # Still reading nothing: the replies pile up until the server drops us. (Had we
        # started reading, the server would go on answering all 200,000 requests.)
        wait_until(lambda: "dropping a connection that does not read" in server.log,
                   timeout=WAIT * 3, what="the server to drop the peer")
        peer.sock.settimeout(WAIT * 3)
        peer.drain_until_closed(timeout=WAIT * 3)
    finally:
        peer.close()
    growth = watch.stop()
    assert growth < 64 * MIB, f"RSS grew by {growth / MIB:.1f} MiB"
    assert "dropping a connection that does not read" in server.log
    print(f"\npipeline: wrote {written} requests before the drop; RSS growth {growth / MIB:.1f} MiB")


def test_clients_that_disconnect_mid_frame(server, probe):
    data = encode_event(Send(request_id=3, to=probe.name, client_msg_id="mid", body="m" * 5000))
    rng = random.Random(3)
    for i in range(100):
        peer = RawPeer(server.host, server.port)
        peer.hello()
        peer.send(Login(request_id=2, name=probe.name, password=PASSWORD))
        peer.send_bytes(data[:rng.randint(1, len(data) - 1)])
        peer.abort() if i % 2 else peer.close()
    # none of those half sends was stored: the probe's fetches (which refuse any message it
    # did not send itself) would have shown them


def test_a_thousand_connections_opened_and_dropped_at_once(server, probe):
    """1,000 connections at once (the default limit, so a few get server_full), then all
    dropped at once, half with a reset: threads and descriptors return to where they were."""
    pid = server.proc.pid
    threads_before, fds_before = thread_count(pid), fd_count(pid)
    peers: list[socket.socket] = []
    errors: list[BaseException] = []

    def open_some(n: int) -> None:
        try:
            for _ in range(n):
                sock = socket.create_connection((server.host, server.port), timeout=WAIT)
                peers.append(sock)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    openers = [threading.Thread(target=open_some, args=(100,)) for _ in range(10)]
    for thread in openers:
        thread.start()
    for thread in openers:
        thread.join(WAIT * 6)
    assert errors == [] and len(peers) == 1000
    partial = encode_event(ListAccounts(request_id=1))[:7]  # a third send half a frame
    for sock in peers[::3]:
        try:
            sock.sendall(partial)
        except OSError:
            pass
    # the server really holds them: a descriptor for each (those refused server_full closed)
    wait_until(lambda: fd_count(pid) >= fds_before + 990, timeout=WAIT * 6,
               what="the server to take in the thousand connections")
    probe.wait_rounds(2)  # served while a thousand others hold connections
    for i, sock in enumerate(peers):
        if i % 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    # everything those connections held is released (bounded: nothing accumulates)
    wait_until(lambda: thread_count(pid) <= threads_before + 4 and fd_count(pid) <= fds_before + 4,
               timeout=WAIT * 6, what="the server to release the dropped connections")
    # and the server still admits new connections up to its limit
    with RawPeer(server.host, server.port) as peer:
        assert peer.hello().version == 1


def test_server_survived_the_whole_module(server):
    assert server.proc.poll() is None
    with RawPeer(server.host, server.port) as peer:
        peer.hello()
        reply = peer.request(ListAccounts(request_id=2, pattern="probe*"))
        assert len(reply.accounts) >= 8  # one probe per test above, all still there
