"""Framing under arbitrary TCP segmentation: one recv() is never one frame (PROTOCOL.md 1).

Requests split byte by byte, at random boundaries, or coalesced by the hundred into one write
must each be answered exactly once, in order.
"""

from __future__ import annotations

import random

import pytest

from chatserver.protocol import (
    AccountList,
    Error,
    Fetch,
    Hello,
    ListAccounts,
    LoggedIn,
    Login,
    Logout,
    Messages,
    Ok,
    Ping,
    Pong,
    Register,
    Send,
    Sent,
    Welcome,
    encode_event,
)
from chatserver.storage.database import SYNC_LEVELS

from .helpers import PASSWORD, fetch_all, pushes_until
from .rawframes import RawClient


# Every test at both sync levels: at --sync normal the I/O loop holds a turn's lone sends
# and commits them together itself (ChatServer.hold_sends); at full the writer thread does.
@pytest.fixture(params=SYNC_LEVELS)
def server(request, server_factory):
    return server_factory(extra_args=["--sync", request.param])


def conversation() -> tuple[list, list[tuple[type, int | None]]]:
    """A script of requests for a fresh server with "peer" registered, and the expected replies."""
    requests = [
        Hello(request_id=1, client="split"),
        Register(request_id=2, name="splitter", password=PASSWORD),
        ListAccounts(request_id=3, pattern="*"),
        Send(request_id=4, to="peer", client_msg_id="c1", body="h\u00e9llo \U0001F600"),
        Ping(nonce=77),
        Send(request_id=5, to="nobody", client_msg_id="", body="lost"),
        Send(request_id=6, to="PEER", client_msg_id="c1", body="again"),
        Fetch(request_id=7, limit=0),
        Logout(request_id=8),
        Login(request_id=9, name="SPLITTER", password=PASSWORD),
    ]
    expected = [(Welcome, 1), (LoggedIn, 2), (AccountList, 3), (Sent, 4), (Pong, None),
                (Error, 5), (Sent, 6), (Messages, 7), (Ok, 8), (LoggedIn, 9)]
    return requests, expected


def check_conversation(events, expected) -> None:
    assert [(type(e), getattr(e, "request_id", None)) for e in events] == expected
    assert events[4].nonce == 77
    assert events[5].code == "no_such_account"
    assert events[3].duplicate is False and events[6].duplicate is True
    assert events[6].message_id == events[3].message_id
    assert events[9].name == "splitter"


def test_frames_split_byte_by_byte(server, raw_connect, connect):
    connect().register("peer", PASSWORD)
    requests, expected = conversation()
    data = b"".join(encode_event(r) for r in requests)
    raw = raw_connect()
    for i in range(len(data)):
        raw.send_bytes(data[i:i + 1])
    events = [raw.next_event() for _ in expected]
    check_conversation(events, expected)
    peer = connect()
    peer.login("peer", PASSWORD)
    assert [m.body for m in fetch_all(peer)] == ["h\u00e9llo \U0001F600"]


@pytest.mark.parametrize("seed", range(3))
def test_frames_split_at_random_boundaries(server, raw_connect, connect, seed):
    connect().register("peer", PASSWORD)
    requests, expected = conversation()
    data = b"".join(encode_event(r) for r in requests)
    rng = random.Random(seed)
    raw = raw_connect()
    pos = 0
    while pos < len(data):
        step = rng.randint(1, 40)
        raw.send_bytes(data[pos:pos + step])
        pos += step
    events = [raw.next_event() for _ in expected]
    check_conversation(events, expected)


def test_many_requests_coalesced_in_one_write(server, raw_connect, connect):
    """300 requests in one sendall: each answered once, in order."""
    connect().register("sink", PASSWORD)
    requests = [Hello(request_id=1), Register(request_id=2, name="batcher", password=PASSWORD)]
    expected: list[tuple[type, int | None]] = [(Welcome, 1), (LoggedIn, 2)]
    rid = 2
    sends = 0
    for i in range(300):
        rid += 1
        kind = i % 4
        if kind == 0:
            requests.append(Send(request_id=rid, to="sink", client_msg_id=f"k{i}", body=f"b{i}"))
            expected.append((Sent, rid))
            sends += 1
        elif kind == 1:
            requests.append(ListAccounts(request_id=rid, pattern="s*"))
            expected.append((AccountList, rid))
        elif kind == 2:
            requests.append(Ping(nonce=rid))
            expected.append((Pong, None))
        else:
            requests.append(Fetch(request_id=rid, limit=1))
            expected.append((Messages, rid))
    rid += 1
    requests.append(Ping(nonce=0xC0FFEE))  # the end marker
    expected.append((Pong, None))

    raw = raw_connect()
    raw.send_bytes(b"".join(encode_event(r) for r in requests))
    events = [raw.next_event() for _ in expected]
    assert [(type(e), getattr(e, "request_id", None)) for e in events] == expected
    pongs = [e.nonce for e in events if isinstance(e, Pong)]
    assert pongs == [r.nonce for r in requests if isinstance(r, Ping)]
    sent_ids = [e.message_id for e in events if isinstance(e, Sent)]
    assert len(sent_ids) == sends == len(set(sent_ids))
    assert sent_ids == sorted(sent_ids)
    assert not any(e.duplicate for e in events if isinstance(e, Sent))
    # nothing more arrives after the end marker: exactly one reply per request
    raw.send(Ping(nonce=1))
    assert raw.next_event() == Pong(nonce=1)

    sink = connect()
    assert sink.login("sink", PASSWORD).pending == sends
    assert [(m.id, m.body) for m in fetch_all(sink)] == [
        (mid, f"b{i}") for mid, i in zip(sent_ids, range(0, 300, 4), strict=True)]


# -- pipelining keeps the meaning of the request order ----------------------------------------

def test_pipelined_fetch_sees_the_send_before_it(raw_connect):
    """Requests of one connection take effect in order: a Fetch pipelined after a Send to
    oneself must include that message, whose Sent reply comes first."""
    raw = raw_connect()
    raw.hello()
    raw.send(Register(request_id=2, name="selfie", password=PASSWORD))
    assert isinstance(raw.reply(), LoggedIn)
    raw.send(Send(request_id=3, to="selfie", client_msg_id="", body="note"),
             Fetch(request_id=4, limit=0))
    sent, messages = raw.reply(), raw.reply()
    assert isinstance(sent, Sent) and isinstance(messages, Messages)
    assert [m.id for m in messages.messages] == [sent.message_id]


def test_pipelined_login_counts_the_send_before_it(server, raw_connect, connect):
    connect().register("bob", PASSWORD)
    raw = raw_connect()
    raw.hello()
    raw.send(Register(request_id=2, name="alice", password=PASSWORD))
    assert isinstance(raw.reply(), LoggedIn)
    raw.send(Send(request_id=3, to="bob", client_msg_id="", body="hi"),
             Logout(request_id=4),
             Login(request_id=5, name="bob", password=PASSWORD),
             Fetch(request_id=6, limit=0))
    sent, ok, logged_in, messages = (raw.reply() for _ in range(4))
    assert isinstance(sent, Sent) and isinstance(ok, Ok)
    assert (logged_in.name, logged_in.pending) == ("bob", 1)
    assert [m.id for m in messages.messages] == [sent.message_id]


def test_pipelined_duplicates_in_one_batch(raw_connect, connect):
    """Retries pipelined right behind the original are recognised even if stored together."""
    connect().register("sink", PASSWORD)
    raw = raw_connect()
    raw.hello()
    raw.send(Register(request_id=2, name="retrier", password=PASSWORD))
    assert isinstance(raw.reply(), LoggedIn)
    raw.send(*[Send(request_id=3 + i, to="sink", client_msg_id=f"k{i // 3}", body=f"b{i // 3}")
               for i in range(30)])
    replies = [raw.reply() for _ in range(30)]
    assert all(isinstance(r, Sent) for r in replies), replies
    for group in range(10):
        first, *repeats = replies[3 * group:3 * group + 3]
        assert first.duplicate is False
        assert [(r.message_id, r.duplicate) for r in repeats] == [(first.message_id, True)] * 2
    sink = connect()
    assert sink.login("sink", PASSWORD).pending == 10
    assert [m.body for m in fetch_all(sink)] == [f"b{g}" for g in range(10)]


def test_pipelined_sends_to_online_and_offline_recipients(raw_connect, connect):
    """One write of sends answered in one pass: each reply says whether its message was
    pushed, repeats and refusals keep their place, and the online recipient gets its pushes,
    in order, and nothing else."""
    sink = connect()
    sink.register("sink", PASSWORD)
    sink.logout()  # offline from here on
    live = connect()
    live.register("live", PASSWORD)
    raw = raw_connect()
    raw.hello()
    raw.send(Register(request_id=2, name="mixer", password=PASSWORD))
    assert isinstance(raw.reply(), LoggedIn)
    script = [("sink", "k0", "to sink"), ("live", "k1", "to live"), ("sink", "k0", "repeat"),
              ("nobody", "k2", "lost"), ("LIVE", "k3", "to live again"), ("sink", "k4", "last")]
    raw.send(*[Send(request_id=10 + i, to=to, client_msg_id=cid, body=body)
               for i, (to, cid, body) in enumerate(script)])
    replies = [raw.reply() for _ in script]
    assert [r.request_id for r in replies] == [10, 11, 12, 13, 14, 15]
    assert isinstance(replies[3], Error) and replies[3].code == "no_such_account"
    sent = [replies[i] for i in (0, 1, 2, 4, 5)]
    assert all(isinstance(r, Sent) for r in sent), replies
    assert [(r.pushed, r.duplicate) for r in sent] == [
        (False, False), (True, False), (False, True), (True, False), (False, False)]
    assert sent[2].message_id == sent[0].message_id
    pushes = pushes_until(live, sent[3].message_id)
    assert [(p.message.id, p.message.body) for p in pushes] == [
        (sent[1].message_id, "to live"), (sent[3].message_id, "to live again")]
    assert sink.login("sink", PASSWORD).pending == 2
    assert [m.body for m in fetch_all(sink)] == ["to sink", "last"]


def test_pipelined_sends_respect_the_queue_cap(server_factory, tmp_path):
    server = server_factory(tmp_path / "cap.db", ["--max-queued-per-account", "5"])
    with server.client() as sink:
        sink.register("sink", PASSWORD)
        sink.logout()
    raw = RawClient(server.host, server.port)
    try:
        raw.hello()
        raw.send(Register(request_id=2, name="burst", password=PASSWORD))
        assert isinstance(raw.reply(), LoggedIn)
        raw.send(*[Send(request_id=3 + i, to="sink", client_msg_id="", body=f"b{i}")
                   for i in range(12)])
        replies = [raw.reply() for _ in range(12)]
    finally:
        raw.close()
    assert [type(r).__name__ for r in replies] == ["Sent"] * 5 + ["Error"] * 7
    assert {r.code for r in replies[5:]} == {"queue_full"}
    with server.client() as sink:
        assert sink.login("sink", PASSWORD).pending == 5
        assert [m.body for m in fetch_all(sink)] == [f"b{i}" for i in range(5)]


def test_more_pipelined_requests_than_the_server_keeps_in_flight(server_factory, tmp_path):
    """1,500 sends in one write: over the per-connection limit of replies in flight, so the
    server has to stop reading for a while; every request is still answered once, in order."""
    server = server_factory(tmp_path / "many.db", ["--send-rate", "0"])
    with server.client() as sink:
        sink.register("sink", PASSWORD)
        sink.logout()
    raw = RawClient(server.host, server.port)
    count = 1500
    try:
        raw.hello()
        raw.send(Register(request_id=2, name="firehose", password=PASSWORD))
        assert isinstance(raw.reply(), LoggedIn)
        raw.send(*[Send(request_id=3 + i, to="sink", client_msg_id=f"f{i}", body=str(i))
                   for i in range(count)], Ping(nonce=99))
        replies = [raw.next_event() for _ in range(count + 1)]
    finally:
        raw.close()
    assert [r.request_id for r in replies[:-1]] == list(range(3, 3 + count))
    assert all(isinstance(r, Sent) and not r.duplicate for r in replies[:-1])
    assert replies[-1] == Pong(nonce=99)
    ids = [r.message_id for r in replies[:-1]]
    assert ids == sorted(ids) and len(set(ids)) == count
    with server.client() as sink:
        assert sink.login("sink", PASSWORD).pending == count
        got = [m.id for m in sink.fetch(1000).messages]
        assert got == ids[:1000]


def test_pipelined_sends_with_refusals_and_retries_over_the_rate(server_factory, tmp_path):
    """One write of sends that the server refuses at once (too large, no such name, over the
    rate), refuses after a lookup, and recognises as retries over the rate: each gets its
    own reply, in order, and only the accepted ones are stored, in order."""
    server = server_factory(tmp_path / "mixed.db", ["--send-rate", "0.001", "--send-burst", "5",
                                                     "--max-message-bytes", "100"])
    with server.client() as sink:
        sink.register("sink", PASSWORD)
        sink.logout()
    raw = RawClient(server.host, server.port)
    sends = [("sink", "k1", "first"), ("sink", "", "x" * 101), ("nobody", "", "lost"),
             ("sink", "k2", "second"), ("sink", "k1", "first again"), ("sink", "", "third"),
             ("sink", "", "over the rate"), ("sink", "k2", "second again"),
             ("sink", "k9", "new, over the rate")]
    try:
        raw.hello()
        raw.send(Register(request_id=2, name="mixer", password=PASSWORD))
        assert isinstance(raw.reply(), LoggedIn)
        raw.send(*[Send(request_id=10 + i, to=to, client_msg_id=cid, body=body)
                   for i, (to, cid, body) in enumerate(sends)])
        replies = [raw.reply() for _ in sends]
    finally:
        raw.close()
    assert [r.request_id for r in replies] == [10 + i for i in range(len(sends))]
    shown = [r.code if isinstance(r, Error) else ("dup" if r.duplicate else "new")
             for r in replies]
    assert shown == ["new", "message_too_large", "no_such_account", "new", "dup", "new",
                     "rate_limited", "dup", "rate_limited"]
    assert replies[4].message_id == replies[0].message_id
    assert replies[7].message_id == replies[3].message_id
    with server.client() as sink:
        sink.login("sink", PASSWORD)
        assert [m.body for m in fetch_all(sink)] == ["first", "second", "third"]
