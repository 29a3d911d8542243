"""The handshake (PROTOCOL.md section 4): Hello/Welcome, unsupported versions, bad first frames."""

from __future__ import annotations

import pytest

from chatserver.protocol import (
    MAX_FRAME_SIZE,
    AccountList,
    Error,
    Fetch,
    Hello,
    ListAccounts,
    Login,
    Ping,
    Pong,
    Welcome,
)

from .helpers import PASSWORD


def assert_serves_normally(connect, name: str = "probe") -> None:
    """A fresh, well-behaved client still gets full service."""
    client = connect()
    assert client.register(name, PASSWORD).name == name
    assert client.list_accounts(name).accounts[0].name == name


def test_welcome_states_version_and_default_limits(connect):
    welcome = connect().welcome
    assert isinstance(welcome, Welcome)
    assert welcome.request_id == 1
    assert welcome.version == 1
    assert welcome.server != ""
    assert welcome.max_frame_size == MAX_FRAME_SIZE == 1_048_576
    assert welcome.max_message_bytes == 65_536
    assert welcome.heartbeat_interval == 30


def test_welcome_echoes_the_hello_request_id(raw_connect):
    raw = raw_connect()
    welcome = raw.hello(request_id=0xDEADBEEF)
    assert isinstance(welcome, Welcome)
    assert welcome.request_id == 0xDEADBEEF
    assert welcome.version == 1


def test_welcome_reflects_configured_limits(server_factory, tmp_path):
    server = server_factory(tmp_path / "limits.db",
                            ["--max-message-bytes", "1000", "--heartbeat-interval", "0"])
    client = server.client()
    try:
        assert client.welcome.max_message_bytes == 1000
        assert client.welcome.heartbeat_interval == 0
    finally:
        client.close()


@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_unsupported_version_gets_error_then_close(raw_connect, connect, version):
    raw = raw_connect()
    raw.send(Hello(request_id=7, version=version, client="future"))
    events = raw.events_until_closed()
    assert len(events) == 1, events
    error = events[0]
    assert isinstance(error, Error)
    assert error.code == "unsupported_version"
    assert error.request_id == 7
    assert "1" in error.text  # names the supported version
    assert_serves_normally(connect)


@pytest.mark.parametrize("first", [
    Login(request_id=1, name="alice", password=PASSWORD),
    ListAccounts(request_id=1),
    Fetch(request_id=1),
    Ping(nonce=5),
], ids=["Login", "ListAccounts", "Fetch", "Ping"])
def test_first_frame_not_hello_is_a_protocol_error(raw_connect, connect, first):
    raw = raw_connect()
    raw.send(first)
    events = raw.events_until_closed()
    assert len(events) == 1, events
    assert isinstance(events[0], Error)
    assert events[0].code == "protocol_error"
    assert events[0].request_id == 0
    assert_serves_normally(connect)


def test_second_hello_is_a_protocol_error(raw_connect, connect):
    raw = raw_connect()
    assert isinstance(raw.hello(), Welcome)
    raw.send(Hello(request_id=2))
    events = raw.events_until_closed()
    assert [(type(e), e.code, e.request_id) for e in events] == [(Error, "protocol_error", 0)]
    assert_serves_normally(connect)


def test_requests_after_a_rejected_version_are_not_served(raw_connect):
    """Frames pipelined behind an unsupported Hello get no replies: the server closes."""
    raw = raw_connect()
    raw.send(Hello(request_id=1, version=9), ListAccounts(request_id=2))
    events = raw.events_until_closed()
    assert [(type(e), e.code) for e in events] == [(Error, "unsupported_version")]


def test_ping_is_answered_with_the_same_nonce(raw_connect):
    raw = raw_connect()
    raw.hello()
    raw.send(Ping(nonce=0xFFFFFFFF), Ping(nonce=0), ListAccounts(request_id=2))
    assert raw.next_event() == Pong(nonce=0xFFFFFFFF)
    assert raw.next_event() == Pong(nonce=0)
    assert isinstance(raw.next_event(), AccountList)


def test_unsolicited_pong_is_ignored(raw_connect):
    raw = raw_connect()
    raw.hello()
    raw.send(Pong(nonce=3), ListAccounts(request_id=2))
    reply = raw.next_event()
    assert isinstance(reply, AccountList) and reply.request_id == 2
