"""Connection: framing, chunking, limits, malformed input, handshake and failure states."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatserver.protocol import (
    CLOSED,
    MAX_FRAME_SIZE,
    NEED_DATA,
    AccountDeleted,
    AccountEntry,
    AccountList,
    Ack,
    Acked,
    Connection,
    DeleteAccount,
    Error,
    Fetch,
    Hello,
    ListAccounts,
    LocalProtocolError,
    LoggedIn,
    Login,
    Logout,
    Message,
    Messages,
    Notice,
    Ok,
    Ping,
    Pong,
    Push,
    Register,
    RemoteProtocolError,
    Send,
    Sent,
    Welcome,
    encode_event,
)

HELLO = Hello(request_id=1, version=1, client="test/1")
HELLO_FRAME = encode_event(HELLO)
MSG = Message(id=10, sender="alice", sent_at=1_700_000_000_000, body="hi ☺")

CLIENT_STREAM = [
    HELLO,
    ListAccounts(request_id=2, pattern="a*", after="", limit=10),
    Register(request_id=3, name="bob", password="secret"),
    Send(request_id=4, to="alice", client_msg_id="c-1", body="héllo " * 50),
    Fetch(request_id=5, limit=0),
    Ack(request_id=6, message_ids=(10, 11, 12)),
    Ping(nonce=99),
    Pong(nonce=7),
    Logout(request_id=7),
    Login(request_id=8, name="bob", password="secret"),
    DeleteAccount(request_id=9, password="secret"),
]
SERVER_STREAM = [
    Welcome(request_id=1, version=1, server="chat/1", max_frame_size=MAX_FRAME_SIZE,
            max_message_bytes=65536, heartbeat_interval=30),
    AccountList(request_id=2, accounts=(AccountEntry("alice", True),), next_after="alice"),
    LoggedIn(request_id=3, name="bob", pending=2),
    Push(MSG),
    Sent(request_id=4, message_id=11, pushed=True, duplicate=False),
    Messages(request_id=5, messages=(MSG, MSG), remaining=0),
    Acked(request_id=6, count=3),
    Ping(nonce=7),
    Pong(nonce=99),
    Ok(request_id=7),
    Notice(code="shutting_down", text="bye"),
    Error(request_id=8, code="storage_unavailable", text="busy", retry_after_ms=250),
    AccountDeleted(request_id=9, discarded=0),
]
# (receiving role, events): what each role receives
STREAMS = [("server", CLIENT_STREAM), ("client", SERVER_STREAM)]


def frame(type_byte: int, payload: bytes = b"") -> bytes:
    """A raw frame, built by hand so tests can make malformed ones."""
    return struct.pack(">IB", 1 + len(payload), type_byte) + payload


def feed(conn: Connection, chunks, eof: bool = True) -> list:
    """Feed ``chunks``, collecting events after each; returns events and the final signal."""
    out = []
    for chunk in chunks:
        conn.receive_data(chunk)
        out.extend(conn.events())
        assert conn.next_event() is NEED_DATA
    if eof:
        conn.receive_data(b"")
        out.extend(conn.events())
        out.append(conn.next_event())
    return out


def failure(role: str, data: bytes, eof: bool = False, **kw) -> tuple[list, RemoteProtocolError]:
    """The events before the error and the error raised when a ``role`` receives ``data``."""
    conn = Connection(role, **kw)
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    events = []
    with pytest.raises(RemoteProtocolError) as info:
        while True:
            event = conn.next_event()
            assert event is not NEED_DATA and event is not CLOSED, events
            events.append(event)
    # The receive side stays failed, with the same error, however it is asked.
    for _ in range(2):
        with pytest.raises(RemoteProtocolError) as again:
            conn.next_event()
        assert again.value is info.value
    with pytest.raises(RemoteProtocolError):
        conn.events()
    assert conn.their_error is info.value and conn.their_state == "ERROR"
    assert info.value.code == "protocol_error"
    return events, info.value


# ---------------------------------------------------------------------------------------
# Streams, whole and in pieces


@pytest.mark.parametrize("role, events", STREAMS)
def test_stream_whole(role, events):
    data = b"".join(map(encode_event, events))
    assert feed(Connection(role), [data]) == events + [CLOSED]


@pytest.mark.parametrize("role, events", STREAMS)
def test_stream_byte_by_byte(role, events):
    data = b"".join(map(encode_event, events))
    chunks = [data[i : i + 1] for i in range(len(data))]
    assert feed(Connection(role), chunks) == events + [CLOSED]


@pytest.mark.parametrize("role, events", STREAMS)
def test_stream_frame_by_frame(role, events):
    assert feed(Connection(role), map(encode_event, events)) == events + [CLOSED]


@pytest.mark.parametrize("role, events", STREAMS)
def test_stream_with_trailing_partial_frame(role, events):
    data = b"".join(map(encode_event, events[:-1]))
    last = encode_event(events[-1])
    for cut in range(1, len(last)):
        conn = Connection(role)
        assert feed(conn, [data + last[:cut]], eof=False) == events[:-1]
        assert conn.trailing_data == cut
        # ...and the rest of it completes the frame
        assert feed(conn, [last[cut:]]) == [events[-1], CLOSED]


@pytest.mark.parametrize("role, events", STREAMS)
def test_eof_mid_frame(role, events):
    data = b"".join(map(encode_event, events[:-1]))
    last = encode_event(events[-1])
    for cut in (1, 3, 4, 5, len(last) - 1):
        before, err = failure(role, data + last[:cut], eof=True)
        assert before == events[:-1]
        assert "closed mid-frame" in str(err)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_stream_in_random_chunks(data):
    role, events = data.draw(st.sampled_from(STREAMS))
    stream = b"".join(map(encode_event, events))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=30)))
    chunks = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    chunks = [c for c in chunks if c]  # b"" would mean EOF
    assert feed(Connection(role), chunks) == events + [CLOSED]


def test_empty_connection_closes_cleanly():
    conn = Connection("server")
    assert conn.next_event() is NEED_DATA
    assert conn.their_state == "AWAIT_HELLO"
    conn.receive_data(b"")
    assert conn.next_event() is CLOSED
    assert conn.next_event() is CLOSED
    assert conn.events() == []
    assert conn.their_state == "CLOSED"


def test_receive_data_after_eof_is_local_error():
    conn = Connection("client")
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(encode_event(Ok(1)))


def test_receive_data_accepts_bytearray_and_memoryview():
    conn = Connection("client")
    data = encode_event(Ok(1)) + encode_event(Ok(2))
    conn.receive_data(bytearray(data[:7]))
    conn.receive_data(memoryview(data)[7:])
    assert conn.events() == [Ok(1), Ok(2)]


def test_events_raises_at_a_bad_frame_but_next_event_gives_the_good_ones_first():
    data = encode_event(Ok(1)) + encode_event(Ok(2)) + frame(0x42)
    conn = Connection("client")
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError, match="unknown frame type 0x42"):
        conn.events()
    assert failure("client", data)[0] == [Ok(1), Ok(2)]


def test_many_frames_and_buffer_compaction():
    # Enough data that the buffer compacts (over 64 KiB consumed) with a frame split across.
    events = [Push(Message(i, "a", i, "x" * 1000)) for i in range(300)]
    data = b"".join(map(encode_event, events))
    conn = Connection("client")
    chunks = [data[i : i + 100_003] for i in range(0, len(data), 100_003)]
    assert feed(conn, chunks) == events + [CLOSED]


# ---------------------------------------------------------------------------------------
# Length limits


def send_of_length(length: int) -> Send:
    """A Send whose frame length field is exactly ``length``."""
    overhead = 1 + 4 + 2 + 2 + 4  # type, request_id, empty to, empty client_msg_id, body length
    return Send(request_id=1, to="", client_msg_id="", body="b" * (length - overhead))


@pytest.mark.parametrize("limit", [MAX_FRAME_SIZE, 64])
def test_frame_of_exactly_max_size_is_accepted(limit):
    event = send_of_length(limit)
    data = encode_event(event, max_frame_size=limit)
    assert struct.unpack(">I", data[:4])[0] == limit
    conn = Connection("server", max_frame_size=limit)
    assert feed(conn, [HELLO_FRAME, data]) == [HELLO, event, CLOSED]


@pytest.mark.parametrize("limit", [MAX_FRAME_SIZE, 64])
def test_frame_over_max_size_is_rejected_from_its_prefix_alone(limit):
    data = encode_event(send_of_length(limit + 1), max_frame_size=limit + 1)
    # The 4 length bytes suffice: no byte of the body is needed, or buffered.
    before, err = failure("server", HELLO_FRAME + data[:4], max_frame_size=limit)
    assert before == [HELLO]
    assert str(limit + 1) in str(err)
    assert failure("server", HELLO_FRAME + data, max_frame_size=limit)[0] == [HELLO]


def test_4gib_length_fails_after_4_bytes():
    conn = Connection("server")
    for byte in b"\xff\xff\xff":
        conn.receive_data(bytes([byte]))
        assert conn.next_event() is NEED_DATA
    conn.receive_data(b"\xff")
    with pytest.raises(RemoteProtocolError, match="4294967295"):
        conn.next_event()


def test_zero_length_fails_after_4_bytes():
    assert failure("client", b"\x00\x00\x00\x00")[0] == []
    assert failure("server", HELLO_FRAME + b"\x00\x00\x00\x00")[0] == [HELLO]


def test_send_refuses_a_frame_over_the_connection_limit():
    conn = Connection("client", max_frame_size=64)
    assert len(conn.send(send_of_length(64))) == 68
    with pytest.raises(LocalProtocolError):
        conn.send(send_of_length(65))


@pytest.mark.parametrize("bad", [0, -1, 2**32, "big", 1.5])
def test_bad_max_frame_size(bad):
    with pytest.raises(LocalProtocolError):
        Connection("server", max_frame_size=bad)


# ---------------------------------------------------------------------------------------
# Malformed frames

STR_AB = b"\x00\x02ab"


def server_failure(data: bytes) -> RemoteProtocolError:
    """A server-role connection's error for ``data`` sent right after a good Hello."""
    before, err = failure("server", HELLO_FRAME + data)
    assert before == [HELLO]
    return err


@pytest.mark.parametrize("type_byte", [0x00, 0x0A, 0x42, 0x83, 0xFE])
def test_unknown_type(type_byte):
    assert "unknown frame type" in str(server_failure(frame(type_byte, b"\x00" * 4)))
    assert "unknown frame type" in str(failure("client", frame(type_byte))[1])


@pytest.mark.parametrize(
    "event", [Ok(1), Push(MSG), Error(0, "x", "y"), Welcome(1, 1, "", 1, 1, 1)]
)
def test_server_frame_sent_to_server(event):
    assert "may not be sent by a client" in str(server_failure(encode_event(event)))


@pytest.mark.parametrize("event", [HELLO, Send(1, "bob", body="x"), Ack(1, ()), Logout(1)])
def test_client_frame_sent_to_client(event):
    assert "may not be sent by a server" in str(failure("client", encode_event(event))[1])


def test_frame_before_hello():
    for event in (Ping(1), Register(1, "bob", "pw"), Send(1, "bob", body="hi")):
        before, err = failure("server", encode_event(event) + HELLO_FRAME)
        assert before == [] and "first frame must be Hello" in str(err)


def test_second_hello():
    assert "second Hello" in str(server_failure(HELLO_FRAME))
    before, err = failure("server", HELLO_FRAME + encode_event(Ping(1)) + HELLO_FRAME)
    assert before == [HELLO, Ping(1)] and "second Hello" in str(err)


def test_client_role_has_no_handshake_to_enforce():
    conn = Connection("client")
    assert conn.their_state == "OPEN"
    conn.receive_data(encode_event(Ping(3)) + encode_event(Ok(1)))
    assert conn.events() == [Ping(3), Ok(1)]


@pytest.mark.parametrize(
    "data",
    [
        frame(0x80, b"\x00\x00\x01"),  # Ok: request_id cut short
        frame(0x04),  # Logout with no payload
        frame(0x02, b"\x00\x00\x00\x01" + STR_AB),  # Register without password
        frame(0x02, b"\x00\x00\x00\x01" + STR_AB + b"\x00\x05abc"),  # str longer than the rest
        frame(0x06, b"\x00\x00\x00\x01" + STR_AB + STR_AB + b"\x00\x00\x00\x09short"),  # text
        frame(0x06, b"\x00\x00\x00\x01" + STR_AB + STR_AB + b"\x00\x00"),  # text length cut
        frame(0x08, b"\x00\x00\x00\x01\x00\x03" + b"\x00" * 16),  # Ack: 3 ids, 2 there
        frame(0x08, b"\x00\x00\x00\x01\x00"),  # Ack: count cut short
    ],
)
def test_truncated_payload(data):
    role = "client" if data[4] >= 0x80 else "server"
    conn_data = data if role == "client" else HELLO_FRAME + data
    assert "ends inside" in str(failure(role, conn_data)[1])


def test_every_truncation_of_every_frame_is_an_error():
    for role, events in STREAMS:
        for event in events:
            body = encode_event(event)[4:]
            for cut in range(1, len(body)):
                prefix = HELLO_FRAME if role == "server" and event != HELLO else b""
                data = struct.pack(">I", cut) + body[:cut]
                err = failure(role, prefix + data)[1]
                assert "ends inside" in str(err), (event, cut)


@pytest.mark.parametrize("extra", [b"\x00", b"\xff" * 7])
def test_trailing_bytes_in_payload(extra):
    for role, events in STREAMS:
        for event in events:
            body = encode_event(event)[4:] + extra
            prefix = HELLO_FRAME if role == "server" and event != HELLO else b""
            err = failure(role, prefix + struct.pack(">I", len(body)) + body)[1]
            assert f"{len(extra)} bytes left over" in str(err), event


@pytest.mark.parametrize(
    "bad_utf8",
    [
        b"\xff",  # never valid
        b"\xc3\x28",  # bad continuation byte
        b"\xed\xa0\x80",  # an encoded surrogate (CESU-8)
        b"\xc0\xaf",  # overlong "/"
        b"ab\xe2\x82",  # cut off
        b"\xf4\x90\x80\x80",  # above U+10FFFF
    ],
)
def test_invalid_utf8_in_str_and_text(bad_utf8):
    as_str = struct.pack(">H", len(bad_utf8)) + bad_utf8
    as_text = struct.pack(">I", len(bad_utf8)) + bad_utf8
    rid = b"\x00\x00\x00\x01"
    cases = [
        ("server", frame(0x02, rid + as_str + STR_AB)),  # Register.name
        ("server", frame(0x06, rid + STR_AB + as_str + b"\x00\x00\x00\x00")),  # client_msg_id
        ("server", frame(0x06, rid + STR_AB + STR_AB + as_text)),  # Send.body (text)
        ("client", frame(0x91, as_str + STR_AB)),  # Notice.code
        ("client", frame(0x90, b"\x00" * 8 + STR_AB + b"\x00" * 8 + as_text)),  # Push body
    ]
    for role, data in cases:
        data = HELLO_FRAME + data if role == "server" else data
        assert "invalid UTF-8" in str(failure(role, data)[1]), data


@pytest.mark.parametrize("value", [2, 0x80, 0xFF])
def test_bool_other_than_0_or_1(value):
    sent = frame(0x86, b"\x00\x00\x00\x01" + b"\x00" * 8 + bytes([1, value]))
    assert "bool value" in str(failure("client", sent)[1])
    entries = frame(0x85, b"\x00\x00\x00\x01\x00\x01" + STR_AB + bytes([value]) + b"\x00\x00")
    assert "bool value" in str(failure("client", entries)[1])


def test_valid_frames_after_the_error_are_not_parsed():
    conn = Connection("client")
    conn.receive_data(frame(0x42))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    buffered = conn.trailing_data
    conn.receive_data(encode_event(Ok(1)))  # dropped: the receive side has failed
    assert conn.trailing_data == buffered
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


# ---------------------------------------------------------------------------------------
# Sending


def test_send_still_works_after_a_remote_error():
    conn = Connection("server")
    conn.receive_data(frame(0x42))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    reply = conn.send(Error(request_id=0, code="protocol_error", text="unknown frame type"))
    assert reply == encode_event(Error(0, "protocol_error", "unknown frame type"))


def test_send_returns_the_frame_bytes():
    assert Connection("client").send(HELLO) == HELLO_FRAME
    assert Connection("server").send(Ok(5)) == frame(0x80, b"\x00\x00\x00\x05")


@pytest.mark.parametrize(
    "role, event",
    [("client", Ok(1)), ("client", Push(MSG)), ("client", Welcome(1, 1, "", 1, 1, 1)),
     ("server", HELLO), ("server", Send(1, "bob", body="x")), ("server", Ack(1, ()))],
)
def test_send_refuses_the_other_roles_frames(role, event):
    with pytest.raises(LocalProtocolError, match="may not send"):
        Connection(role).send(event)


def test_send_refuses_non_events():
    for bad in (MSG, AccountEntry("a", True), b"raw", None):
        with pytest.raises(LocalProtocolError):
            Connection("server").send(bad)  # type: ignore[arg-type]


def test_ping_and_pong_go_both_ways():
    for role in ("client", "server"):
        assert Connection(role).send(Ping(1)) == encode_event(Ping(1))
        assert Connection(role).send(Pong(1)) == encode_event(Pong(1))


def test_bad_role():
    with pytest.raises(LocalProtocolError):
        Connection("peer")
