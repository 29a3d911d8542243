"""Malformed input against a live server (PROTOCOL.md sections 1, 2 and 6).

Each bad peer must get ``Error(protocol_error)`` with request id 0 and be disconnected, while
the server goes on serving everyone else.
"""

from __future__ import annotations

import itertools
import random
import re
import socket

import pytest

from chatserver.protocol import (
    AccountList,
    Error,
    Fetch,
    Hello,
    ListAccounts,
    LoggedIn,
    Messages,
    Ping,
    Pong,
    Register,
    Welcome,
    encode_event,
)

from .helpers import PASSWORD, fetch_all, log_lines, wait_until
from .rawframes import frame, str_field, text_field, u16, u32


@pytest.fixture
def server(module_server):
    """One server takes all the abuse of this module, and must go on serving throughout."""
    return module_server


def assert_protocol_error_then_close(raw) -> Error:
    events = raw.events_until_closed()
    assert len(events) == 1, events
    [error] = events
    assert isinstance(error, Error), error
    assert (error.code, error.request_id) == ("protocol_error", 0)
    return error


_names = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}{next(_names)}"


def assert_server_healthy(server, connect) -> None:
    """The process is alive and a normal client gets full service."""
    assert server.proc.poll() is None
    name = unique("probe")
    client = connect()
    client.register(name, PASSWORD)
    sent = client.send(name, "note to self")
    assert [m.id for m in fetch_all(client)] == [sent.message_id]
    assert "Traceback" not in server.log  # bad input is contained, never a crash


# -- garbage ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("after_hello", [False, True], ids=["before-hello", "after-hello"])
def test_random_bytes(server, raw_connect, connect, seed, after_hello):
    rng = random.Random(seed)
    garbage = rng.randbytes(rng.randint(1, 300))
    raw = raw_connect()
    if after_hello:
        assert isinstance(raw.hello(), Welcome)
    raw.send_bytes(garbage)
    raw.sock.shutdown(socket.SHUT_WR)  # so that an incomplete "frame" ends too
    assert_protocol_error_then_close(raw)
    assert_server_healthy(server, connect)


@pytest.mark.parametrize("prefix", [b"\xff\xff\xff\xff", b"\x00\x10\x00\x01", b"\x00\x00\x00\x00"],
                         ids=["0xFFFFFFFF", "MAX+1", "zero"])
@pytest.mark.parametrize("after_hello", [False, True], ids=["before-hello", "after-hello"])
def test_bad_length_prefix_fails_at_once(server, raw_connect, connect, prefix, after_hello):
    """The length is checked as soon as its 4 bytes are in: no body is awaited."""
    raw = raw_connect()
    if after_hello:
        raw.hello()
    raw.send_bytes(prefix)  # and nothing more: the write side stays open
    error = assert_protocol_error_then_close(raw)
    assert error.text
    assert_server_healthy(server, connect)


def test_frame_of_exactly_max_frame_size_is_accepted(server, raw_connect, connect):
    """1,048,576 is a legal length: the oversized body is refused, not the frame."""
    raw = raw_connect()
    raw.hello()
    name = unique("big")
    raw.send(Register(request_id=2, name=name, password=PASSWORD))
    assert isinstance(raw.reply(), LoggedIn)
    fixed = 1 + 4 + (2 + len(name)) + 2 + 4  # type, request_id, to, empty client_msg_id, length
    body = b"b" * (1_048_576 - fixed)
    payload = u32(3) + str_field(name.encode()) + str_field(b"") + text_field(body)
    data = frame(0x06, payload)
    assert len(data) == 4 + 1_048_576
    raw.send_bytes(data)
    reply = raw.reply()
    assert isinstance(reply, Error)
    assert (reply.request_id, reply.code) == (3, "message_too_large")
    # the connection is still in sync
    assert raw.request(Ping(nonce=9)) == Pong(nonce=9)
    assert isinstance(raw.request(Fetch(request_id=4, limit=0)), Messages)


# -- bad frames after a good Hello ------------------------------------------------------------

@pytest.mark.parametrize("type_byte", [0x00, 0x0A, 0x22, 0x42, 0x7F, 0xFE],
                         ids=lambda b: f"0x{b:02X}")
def test_unknown_frame_type(server, raw_connect, connect, type_byte):
    raw = raw_connect()
    raw.hello()
    raw.send_bytes(frame(type_byte, u32(2)))
    assert_protocol_error_then_close(raw)
    assert_server_healthy(server, connect)


@pytest.mark.parametrize("type_byte", [0x80, 0x81, 0x86, 0x90, 0x91, 0xFF],
                         ids=lambda b: f"0x{b:02X}")
def test_server_frame_types_from_a_client(server, raw_connect, connect, type_byte):
    raw = raw_connect()
    raw.hello()
    raw.send_bytes(frame(type_byte, u32(2)))
    assert_protocol_error_then_close(raw)
    assert_server_healthy(server, connect)


def register_raw(raw, name: str, request_id: int = 2) -> None:
    raw.send(Register(request_id=request_id, name=name, password=PASSWORD))
    assert isinstance(raw.reply(), LoggedIn)


BAD_UTF8 = [b"\xff", b"\xc3\x28", b"abc\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf"]


@pytest.mark.parametrize("bad", BAD_UTF8, ids=lambda b: b.hex())
def test_invalid_utf8_in_a_str_field(server, raw_connect, connect, bad):
    client = connect()
    before = client.list_accounts(limit=500).accounts
    raw = raw_connect()
    raw.hello()
    raw.send_bytes(frame(0x02, u32(2) + str_field(bad) + str_field(PASSWORD.encode())))
    error = assert_protocol_error_then_close(raw)
    assert "utf-8" in error.text.lower()
    # nothing was registered under any decoding of the bad name
    assert client.list_accounts(limit=500).accounts == before
    assert_server_healthy(server, connect)


@pytest.mark.parametrize("bad", BAD_UTF8, ids=lambda b: b.hex())
def test_invalid_utf8_in_a_text_field(server, raw_connect, connect, bad):
    raw = raw_connect()
    raw.hello()
    name = unique("writer")
    register_raw(raw, name)
    payload = u32(3) + str_field(name.encode()) + str_field(b"") + text_field(b"ok " + bad)
    raw.send_bytes(frame(0x06, payload))
    assert_protocol_error_then_close(raw)
    # nothing was stored
    reader = connect()
    assert reader.login(name, PASSWORD).pending == 0
    assert_server_healthy(server, connect)


def test_invalid_utf8_in_hello(server, raw_connect, connect):
    raw = raw_connect()
    raw.send_bytes(frame(0x01, u32(1) + u16(1) + str_field(b"\xff\xfe")))
    assert_protocol_error_then_close(raw)
    assert_server_healthy(server, connect)


@pytest.mark.parametrize("data", [
    frame(0x04, u32(2) + b"\x00"),                                     # Logout + 1 extra byte
    frame(0x04, b"\x00\x00"),                                          # Logout, short request_id
    frame(0x03, u32(2) + str_field(b"alice")),                         # Login without password
    frame(0x03, u32(2) + u16(10) + b"abc"),                            # str longer than payload
    frame(0x07, u32(2)),                                               # Fetch without limit
    frame(0x08, u32(2) + u16(3) + b"\x00" * 8),                        # Ack: 3 ids said, 1 sent
    frame(0x06, u32(2) + str_field(b"a") + str_field(b"") + u32(99) + b"hi"),  # text too short
], ids=["trailing", "short-int", "missing-field", "short-str", "missing-u16", "short-list",
        "short-text"])
def test_payload_too_short_or_too_long(server, raw_connect, connect, data):
    raw = raw_connect()
    raw.hello()
    raw.send_bytes(data)
    assert_protocol_error_then_close(raw)
    assert_server_healthy(server, connect)


def test_good_frames_before_a_bad_one_are_answered_first(raw_connect):
    raw = raw_connect()
    good = b"".join(encode_event(e) for e in (
        Hello(request_id=1), ListAccounts(request_id=2), Ping(nonce=1), ListAccounts(request_id=3)))
    raw.send_bytes(good + frame(0x42) + encode_event(ListAccounts(request_id=4)))
    events = raw.events_until_closed()
    assert [type(e) for e in events] == [Welcome, AccountList, Pong, AccountList, Error]
    assert [getattr(e, "request_id", None) for e in events] == [1, 2, None, 3, 0]
    assert events[-1].code == "protocol_error"


# -- disconnects mid-frame --------------------------------------------------------------------

def test_truncated_frame_then_disconnect(server, raw_connect, connect):
    raw = raw_connect()
    raw.hello()
    host, port = raw.sock.getsockname()[:2]
    peer = f"{host}:{port}"
    data = encode_event(Register(request_id=2, name="halfway", password=PASSWORD))
    raw.send_bytes(data[: len(data) // 2])
    raw.close()
    wait_until(lambda: log_lines(server, rf"disconnect {re.escape(peer)}$"),
               what="the server to notice the disconnect")
    # the half frame did nothing
    client = connect()
    assert client.list_accounts("halfway").accounts == ()
    assert_server_healthy(server, connect)


def test_truncated_frame_then_half_close_gets_protocol_error(server, raw_connect, connect):
    raw = raw_connect()
    raw.hello()
    data = encode_event(Register(request_id=2, name="halfway", password=PASSWORD))
    raw.send_bytes(data[:3])  # not even a whole length prefix
    raw.sock.shutdown(socket.SHUT_WR)
    assert_protocol_error_then_close(raw)
    assert_server_healthy(server, connect)


def test_requests_then_half_close_are_all_answered(raw_connect):
    """EOF after whole frames is a clean end: every request is still answered."""
    raw = raw_connect()
    name = unique("quick")
    raw.send(Hello(request_id=1),
             Register(request_id=2, name=name, password=PASSWORD),
             ListAccounts(request_id=3, pattern=name))
    raw.sock.shutdown(socket.SHUT_WR)
    events = raw.events_until_closed()
    assert [type(e) for e in events] == [Welcome, LoggedIn, AccountList]
    assert [(a.name, a.online) for a in events[2].accounts] == [(name, True)]
