"""sessions: Output (non-blocking writes, queueing, limits, failure), corked(), ReplyQueue and
SessionRegistry.

Sockets are socketpair()s with small buffers so a large write is only partly taken; the
server's side is non-blocking, as the server makes it. ``SpySocket`` counts the ``send``
calls an Output makes, to see what went out in one go.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from collections.abc import Iterator

import pytest

from chatserver.sessions import (
    WRITE_BATCH_BYTES,
    Output,
    ReplyQueue,
    SessionRegistry,
    corked,
)

WAIT = 10  # seconds; a bound on hangs, never an assertion about speed
BUFFER = 4096  # requested SO_SNDBUF / SO_RCVBUF (the kernel may round it up)
BIG = 1024 * 1024  # far more than the pair's buffers hold


class SpySocket:
    """A socket that records each ``send`` an Output makes (and what it took)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sends: list[bytes] = []

    def send(self, data: bytes) -> int:
        sent = self.sock.send(data)
        self.sends.append(bytes(data[:sent]))
        return sent

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)


class Calls:
    """A callback that counts its calls."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(server side, non-blocking with a small send buffer; peer, with a small receive one)."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    ours.setblocking(False)
    theirs.settimeout(WAIT)
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


def make_output(sock, **kwargs) -> tuple[Output, Calls, Calls]:
    blocked, failed = Calls(), Calls()
    output = Output(sock, on_blocked=blocked, on_failed=failed, **kwargs)
    return output, blocked, failed


def received_now(sock: socket.socket) -> bytes:
    """What the peer can read without waiting (b"" if nothing)."""
    data = b""
    sock.setblocking(False)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(WAIT)
    return data


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(min(65536, size - len(data)))
        if not chunk:
            break
        data += chunk
    return data


def flush_while_reading(output: Output, ours: socket.socket, theirs: socket.socket,
                        size: int) -> bytes:
    """Flush ``output`` whenever ``ours`` is writable, as the I/O loop does, while a thread
    reads ``size`` bytes at the peer; return what the peer read."""
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(read_exactly(theirs, size)))
    reader.start()
    try:
        for _ in range(100_000):  # bounded; every round waits for the socket or flushes
            if output.flush():
                break
            select.select([], [ours], [], WAIT)
        else:
            pytest.fail("flush() never emptied the queue")
    finally:
        reader.join(WAIT)
    assert got, "the reader did not finish"
    return got[0]


def fill(output: Output, blocked: Calls) -> bytes:
    """Write until the socket takes no more and a tail is queued; return what was written."""
    payload = bytes(range(256)) * (BIG // 256)
    assert output.write(payload)
    assert blocked.count == 1 and output.pending > 0
    return payload


# -- Output: writes ---------------------------------------------------------------------------

def test_write_goes_out_at_once_when_the_socket_takes_it(pair):
    """A small write is sent by the writing thread itself: nothing queued, no on_blocked."""
    ours, theirs = pair
    output, blocked, failed = make_output(ours)
    assert output.write(b"hello") is True
    assert output.pending == 0
    assert received_now(theirs) == b"hello"
    assert (blocked.count, failed.count) == (0, 0)


def test_what_the_socket_does_not_take_is_queued_and_on_blocked_is_called(pair):
    """A write larger than the buffer is partly sent; the rest is queued and on_blocked is
    called once. Later writes queue behind it, and flush() delivers all of it in order."""
    ours, theirs = pair
    output, blocked, failed = make_output(ours)
    payload = bytes(range(256)) * (BIG // 256)
    assert output.write(payload) is True
    assert blocked.count == 1
    assert 0 < output.pending < len(payload)
    sent_already = len(payload) - output.pending

    assert output.write(b"after") is True  # queued behind the tail, not sent ahead of it
    assert output.pending == len(payload) - sent_already + len(b"after")
    assert blocked.count == 1  # the loop was told already

    got = flush_while_reading(output, ours, theirs, len(payload) + len(b"after"))
    assert got == payload + b"after"
    assert output.pending == 0
    assert failed.count == 0


def test_flush_with_nothing_queued_is_done(pair):
    """flush() of an empty output sends nothing and reports it is done."""
    ours, theirs = pair
    spy = SpySocket(ours)
    output, _blocked, _failed = make_output(spy)
    assert output.flush() is True
    assert spy.sends == []
    assert received_now(theirs) == b""


def test_exceeding_max_bytes_fails_the_connection_once(pair, caplog):
    """Queuing past max_bytes drops the connection: a warning, on_failed once, the queue
    emptied, the socket shut down, and every later write refused."""
    ours, theirs = pair
    caplog.set_level(logging.WARNING, logger="chatserver.sessions")
    limit = 64 * 1024
    output, blocked, failed = make_output(ours, max_bytes=limit)
    assert output.write(b"x" * 1000)  # taken by the socket
    while blocked.count == 0:  # fill the socket's buffer until a tail is queued
        assert output.write(b"y" * 1000)
    accepted = []
    for _ in range(limit // 1000 + 2):  # enough to pass the limit
        ok = output.write(b"z" * 1000)
        accepted.append(ok)
        if not ok:
            break
    assert accepted[-1] is False, "the limit was never enforced"
    assert all(accepted[:-1])
    assert failed.count == 1
    assert output.pending == 0
    assert any("dropping a connection that does not read" in r.getMessage()
               for r in caplog.records)

    assert output.write(b"later") is False
    assert output.flush() is True  # nothing left to send
    assert failed.count == 1  # still once
    # The socket was shut down: the peer reads what was sent, then end of stream.
    theirs.settimeout(WAIT)
    while theirs.recv(65536):
        pass


def test_queue_never_holds_more_than_max_bytes_behind_a_tail(pair):
    """Writes queued behind a tail are accepted only while the total stays within max_bytes."""
    ours, _theirs = pair
    limit = 10_000
    output, blocked, failed = make_output(ours, max_bytes=limit)
    while blocked.count == 0:
        assert output.write(b"y" * 100)
    while output.write(b"z" * 100):
        assert output.pending <= limit
    assert failed.count == 1


def test_peer_gone_fails_the_write(pair):
    """A write to a socket whose peer has closed calls on_failed and returns False."""
    ours, theirs = pair
    output, blocked, failed = make_output(ours)
    theirs.close()
    assert output.write(b"hello") is False
    assert failed.count == 1
    assert output.write(b"again") is False
    assert failed.count == 1
    assert blocked.count == 0


def test_peer_gone_during_flush_fails_the_output(pair):
    """flush() of a queued tail to a peer that has gone calls on_failed (once) and drops
    the queue."""
    ours, theirs = pair
    output, blocked, failed = make_output(ours)
    fill(output, blocked)
    theirs.close()
    assert output.flush() is True  # nothing left: it was dropped
    assert failed.count == 1
    assert output.pending == 0
    assert output.write(b"more") is False
    assert failed.count == 1


def test_close_makes_writes_return_false(pair):
    """After close(), writes are refused and the queue is gone, without on_failed."""
    ours, theirs = pair
    output, blocked, failed = make_output(ours)
    fill(output, blocked)
    output.close()
    assert output.pending == 0
    assert output.write(b"late") is False
    assert output.flush() is True
    assert failed.count == 0


def test_encrypt_applies_to_writes_and_raw_bypasses_it(pair):
    """With ``encrypt`` set, writes go out encrypted; raw=True writes go out as given; an
    encrypt that yields nothing sends nothing."""
    ours, theirs = pair
    output, _blocked, _failed = make_output(ours)
    output.encrypt = lambda data: b"E(" + data + b")" if data != b"swallowed" else b""
    assert output.write(b"secret") is True
    assert output.write(b"alert", raw=True) is True
    assert output.write(b"swallowed") is True
    assert output.write(b"more") is True
    assert received_now(theirs) == b"E(secret)alertE(more)"


# -- corked() ---------------------------------------------------------------------------------

def test_corked_writes_are_held_and_sent_in_one_go(pair):
    """Writes inside corked() send nothing until the block ends, then one send, in order."""
    ours, theirs = pair
    spy = SpySocket(ours)
    output, blocked, _failed = make_output(spy)
    with corked():
        for frame in (b"one,", b"two,", b"three"):
            assert output.write(frame) is True
        assert spy.sends == []
        assert received_now(theirs) == b""
        assert output.pending == len(b"one,two,three")
    assert spy.sends == [b"one,two,three"]
    assert received_now(theirs) == b"one,two,three"
    assert output.pending == 0
    assert blocked.count == 0


def test_writes_after_a_corked_block_go_out_at_once(pair):
    """The cork ends with its block: a later write is sent by itself, at once."""
    ours, theirs = pair
    spy = SpySocket(ours)
    output, _blocked, _failed = make_output(spy)
    with corked():
        output.write(b"held")
    output.write(b"free")
    assert spy.sends == [b"held", b"free"]
    assert received_now(theirs) == b"heldfree"


def test_write_from_another_thread_during_a_cork_queues_behind_the_held_ones(pair):
    """Another thread's write to an output held by a corked block waits behind the held
    frames (no send of its own), so the peer sees the order of the writes."""
    ours, theirs = pair
    spy = SpySocket(ours)
    output, _blocked, _failed = make_output(spy)
    results = []
    with corked():
        output.write(b"1")
        other = threading.Thread(target=lambda: results.append(output.write(b"2")))
        other.start()
        other.join(WAIT)
        assert results == [True]
        output.write(b"3")
        assert spy.sends == []
    assert spy.sends == [b"123"]
    assert received_now(theirs) == b"123"


def test_cork_holds_only_the_corking_threads_writes(pair):
    """Another thread's write to an output the block has not written to goes out at once."""
    ours, theirs = pair
    spy = SpySocket(ours)
    output, _blocked, _failed = make_output(spy)
    with corked():
        other = threading.Thread(target=lambda: output.write(b"elsewhere"))
        other.start()
        other.join(WAIT)
        assert spy.sends == [b"elsewhere"]
    assert received_now(theirs) == b"elsewhere"


def test_several_outputs_in_one_cork_each_get_one_send():
    """Interleaved writes to several outputs in one block: one send per output at the end."""
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        spies = [SpySocket(ours) for ours, _ in pairs]
        for ours, _ in pairs:
            ours.setblocking(False)
        outputs = [make_output(spy)[0] for spy in spies]
        with corked():
            for round_ in range(3):
                for n, output in enumerate(outputs):
                    output.write(f"[{n}.{round_}]".encode())
            assert all(spy.sends == [] for spy in spies)
        for n, (spy, (_ours, theirs)) in enumerate(zip(spies, pairs)):
            expected = f"[{n}.0][{n}.1][{n}.2]".encode()
            assert spy.sends == [expected]
            assert received_now(theirs) == expected
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


class TakesEverything:
    """A socket whose peer keeps up with anything: every ``send`` is taken whole."""

    def __init__(self) -> None:
        self.sends: list[int] = []

    def send(self, data: bytes) -> int:
        self.sends.append(len(data))
        return len(data)

    def shutdown(self, how: int) -> None:
        pass


def test_a_cork_holding_more_than_the_limit_for_a_reader_that_keeps_up_never_drops_it():
    """A commit can push far more to one connection than its 4 MiB limit (300 pushes of
    60 KB). Held frames are sent every WRITE_BATCH_BYTES, and only what the socket refuses
    counts against the limit, so a reader that keeps up is never dropped."""
    limit = 4 * 1024 * 1024
    frame = b"p" * 60_000
    sock = TakesEverything()
    output, blocked, failed = make_output(sock, max_bytes=limit)
    with corked():
        for _ in range(300):
            assert output.write(frame) is True
            assert output.pending < WRITE_BATCH_BYTES
    assert failed.count == 0 and blocked.count == 0
    assert sum(sock.sends) == 300 * len(frame) and output.pending == 0
    assert len(sock.sends) < 300  # held frames still went out several per send
    assert max(sock.sends) < WRITE_BATCH_BYTES + len(frame)


def test_corked_output_the_socket_does_not_take_calls_on_blocked(pair):
    """If the socket takes only part of what a cork held, the rest stays queued and
    on_blocked asks the loop to flush it; it then arrives complete and in order."""
    ours, theirs = pair
    output, blocked, failed = make_output(ours)
    payload = bytes(range(256)) * (BIG // 256)
    with corked():
        output.write(payload[:BIG // 2])
        output.write(payload[BIG // 2:])
        assert blocked.count == 0
    assert blocked.count == 1
    assert output.pending > 0
    assert flush_while_reading(output, ours, theirs, len(payload)) == payload
    assert failed.count == 0


def test_nested_outputs_in_nested_corks_each_get_one_send():
    """A corked block inside another: what the inner block wrote goes out when it ends, one
    send per output, and the outer block's outputs get one send when the outer ends."""
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        for ours, _ in pairs:
            ours.setblocking(False)
        outer_spy, inner_spy = (SpySocket(ours) for ours, _ in pairs)
        outer_out, inner_out = make_output(outer_spy)[0], make_output(inner_spy)[0]
        with corked():
            outer_out.write(b"a")
            with corked():
                inner_out.write(b"x")
                outer_out.write(b"b")
                inner_out.write(b"y")
                assert inner_spy.sends == outer_spy.sends == []
            assert inner_spy.sends == [b"xy"]
            outer_out.write(b"c")
            assert outer_spy.sends == []
        assert outer_spy.sends == [b"abc"]
        assert inner_spy.sends == [b"xy"]
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


def test_outer_cork_still_holds_new_outputs_after_an_inner_cork_ends():
    """After a nested corked block ends, the outer block still holds this thread's writes,
    including to outputs first written after the inner block."""
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        for ours, _ in pairs:
            ours.setblocking(False)
        first_spy, later_spy = (SpySocket(ours) for ours, _ in pairs)
        first, later = make_output(first_spy)[0], make_output(later_spy)[0]
        with corked():
            with corked():
                first.write(b"inner")
            later.write(b"1")
            later.write(b"2")
            assert later_spy.sends == [], "written inside the outer block, yet sent at once"
        assert later_spy.sends == [b"12"]
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


# -- ReplyQueue -------------------------------------------------------------------------------

class Writes:
    """A ``write`` for a ReplyQueue that records each call."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def __call__(self, data: bytes) -> bool:
        self.calls.append(data)
        return True


def test_reply_with_nothing_outstanding_is_written_at_once():
    """A ready reply with no earlier request pending is written immediately, alone."""
    writes = Writes()
    replies = ReplyQueue(writes)
    replies.reply(b"A")
    replies.reply(b"B")
    assert writes.calls == [b"A", b"B"]
    assert replies.outstanding == 0


def test_replies_go_out_in_request_order_when_later_ones_complete_first():
    """Later slots filled first wait; filling the first writes all ready ones, in request
    order, in one write."""
    writes = Writes()
    replies = ReplyQueue(writes)
    first, second, third = replies.reserve(), replies.reserve(), replies.reserve()
    assert replies.outstanding == 3
    replies.fill(third, b"3")
    replies.fill(second, b"2")
    assert writes.calls == []
    assert replies.outstanding == 3
    replies.fill(first, b"1")
    assert writes.calls == [b"123"]
    assert replies.outstanding == 0


def test_only_the_ready_prefix_is_written():
    """Filling the head writes it and the ready ones after it, up to the first gap."""
    writes = Writes()
    replies = ReplyQueue(writes)
    a, b, c, d = (replies.reserve() for _ in range(4))
    replies.fill(b, b"b")
    replies.fill(d, b"d")
    replies.fill(a, b"a")
    assert writes.calls == [b"ab"]
    assert replies.outstanding == 2
    replies.fill(c, b"c")
    assert writes.calls == [b"ab", b"cd"]
    assert replies.outstanding == 0


def test_ready_reply_waits_behind_an_earlier_reserved_one():
    """reply() while an earlier request is unanswered waits for it, then both go in one write."""
    writes = Writes()
    replies = ReplyQueue(writes)
    slot = replies.reserve()
    replies.reply(b"second")
    assert writes.calls == []
    assert replies.outstanding == 2
    replies.fill(slot, b"first,")
    assert writes.calls == [b"first,second"]
    assert replies.outstanding == 0


def test_call_when_below_is_false_and_never_calls_when_already_below():
    """Fewer outstanding than the limit: False, and the callback is never called."""
    writes = Writes()
    replies = ReplyQueue(writes)
    calls = Calls()
    slot = replies.reserve()
    assert replies.call_when_below(2, calls) is False
    replies.fill(slot, b"x")
    assert calls.count == 0


def test_call_when_below_calls_once_when_the_count_drops_below():
    """At the limit: True; the callback runs once, when a write takes the count below it."""
    writes = Writes()
    replies = ReplyQueue(writes)
    calls = Calls()
    a, b, c = (replies.reserve() for _ in range(3))
    assert replies.call_when_below(2, calls) is True
    replies.fill(b, b"b")  # not written yet: a is still missing
    assert calls.count == 0
    replies.fill(a, b"a")  # writes a and b: one outstanding, below 2
    assert writes.calls == [b"ab"]
    assert calls.count == 1
    replies.fill(c, b"c")
    assert calls.count == 1


def test_call_when_below_waits_until_strictly_below():
    """A drop that leaves the count at the limit does not call; the next drop below does."""
    writes = Writes()
    replies = ReplyQueue(writes)
    calls = Calls()
    slots = [replies.reserve() for _ in range(3)]
    assert replies.call_when_below(2, calls) is True
    replies.fill(slots[0], b"0")  # 2 left: not below 2
    assert calls.count == 0
    replies.fill(slots[1], b"1")
    assert calls.count == 1


def test_fills_from_many_threads_keep_request_order():
    """Slots filled concurrently from several threads are written in request order."""
    writes = Writes()
    replies = ReplyQueue(writes)
    slots = [replies.reserve() for _ in range(400)]
    barrier = threading.Barrier(4)

    def filler(k: int) -> None:
        barrier.wait(WAIT)
        for i in range(len(slots) - 1 - k, -1, -4):  # each thread fills from the back
            replies.fill(slots[i], b"%d," % i)

    threads = [threading.Thread(target=filler, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert b"".join(writes.calls) == b"".join(b"%d," % i for i in range(400))
    assert replies.outstanding == 0


# -- SessionRegistry --------------------------------------------------------------------------

class FakeSession:
    def push_frame(self, frame: bytes) -> bool:
        return True

    def account_deleted(self, frame: bytes) -> None:
        pass


def test_registry_tracks_sessions_per_account():
    """Attach/detach: sessions_of, is_online and online_account_ids follow, and an account
    with several sessions stays online until its last one is detached."""
    registry = SessionRegistry()
    phone, laptop, other = FakeSession(), FakeSession(), FakeSession()
    assert registry.sessions_of(1) == []
    assert not registry.is_online(1)

    registry.attach(1, phone)
    registry.attach(1, laptop)
    registry.attach(2, other)
    assert set(registry.sessions_of(1)) == {phone, laptop}
    assert registry.sessions_of(2) == [other]
    assert sorted(registry.online_account_ids()) == [1, 2]

    registry.detach(1, phone)
    assert registry.sessions_of(1) == [laptop]
    assert registry.is_online(1)
    registry.detach(1, laptop)
    assert registry.sessions_of(1) == []
    assert not registry.is_online(1)
    assert registry.online_account_ids() == [2]


def test_registry_detach_of_unknown_is_harmless_and_attach_is_idempotent():
    """Detaching what is not attached changes nothing; attaching twice keeps one entry."""
    registry = SessionRegistry()
    session = FakeSession()
    registry.detach(7, session)
    registry.attach(7, session)
    registry.attach(7, session)
    registry.detach(7, FakeSession())
    assert registry.sessions_of(7) == [session]
    registry.detach(7, session)
    assert registry.online_account_ids() == []


def test_sessions_of_returns_a_copy():
    """The list sessions_of returns is a snapshot: changing it or the registry later does
    not affect the other."""
    registry = SessionRegistry()
    first, second = FakeSession(), FakeSession()
    registry.attach(3, first)
    snapshot = registry.sessions_of(3)
    registry.attach(3, second)
    snapshot.clear()
    assert snapshot == []
    assert set(registry.sessions_of(3)) == {first, second}


def test_registry_from_many_threads():
    """Concurrent attaches and detaches of distinct sessions leave exactly what remains."""
    registry = SessionRegistry()
    sessions = {t: [FakeSession() for _ in range(100)] for t in range(4)}
    barrier = threading.Barrier(4)

    def churn(t: int) -> None:
        barrier.wait(WAIT)
        for i, session in enumerate(sessions[t]):
            registry.attach(i % 5, session)
        for session_index, session in enumerate(sessions[t]):
            if session_index % 2:
                registry.detach(session_index % 5, session)

    threads = [threading.Thread(target=churn, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    for account in range(5):
        expected = {s for t in range(4) for i, s in enumerate(sessions[t])
                    if i % 5 == account and i % 2 == 0}
        assert set(registry.sessions_of(account)) == expected
    assert sorted(registry.online_account_ids()) == [0, 1, 2, 3, 4]


def test_fills_inside_a_cork_are_written_together_when_it_ends():
    """A corked block's fills write nothing until it ends; then one write, in request order,
    up to the first slot still missing."""
    writes = Writes()
    replies = ReplyQueue(writes)
    a, b, c, d = (replies.reserve() for _ in range(4))
    with corked():
        replies.fill(b, b"b")
        replies.fill(a, b"a")
        replies.fill(d, b"d")
        assert writes.calls == []
        assert replies.outstanding == 4
    assert writes.calls == [b"ab"]
    assert replies.outstanding == 2
    replies.fill(c, b"c")  # outside a cork: at once, with the held d behind it
    assert writes.calls == [b"ab", b"cd"]


def test_a_fill_outside_the_cork_writes_what_the_cork_filled_before_it():
    """Another thread's fill (the loop refusing a later send) while a cork holds earlier
    filled slots writes them all, in order; the cork's end then finds nothing left."""
    writes = Writes()
    replies = ReplyQueue(writes)
    a, b = replies.reserve(), replies.reserve()
    with corked():
        replies.fill(a, b"a")
        other = threading.Thread(target=replies.fill, args=(b, b"b"))
        other.start()
        other.join()
        assert writes.calls == [b"ab"]
    assert writes.calls == [b"ab"]
    assert replies.outstanding == 0


def test_a_corked_fill_that_drops_below_the_limit_calls_the_waiter_when_the_cork_ends():
    writes = Writes()
    replies = ReplyQueue(writes)
    calls = Calls()
    a, b = replies.reserve(), replies.reserve()
    assert replies.call_when_below(2, calls) is True
    with corked():
        replies.fill(a, b"a")
        assert calls.count == 0
    assert writes.calls == [b"a"]
    assert calls.count == 1
    replies.fill(b, b"b")


def test_a_failing_release_does_not_leave_the_other_corked_queues_held(caplog):
    def broken(_data: bytes) -> bool:
        raise RuntimeError("boom")

    first, second = ReplyQueue(broken), ReplyQueue(writes := Writes())
    a, b = first.reserve(), second.reserve()
    with caplog.at_level(logging.ERROR), corked():
        first.fill(a, b"a")
        second.fill(b, b"b")
    assert writes.calls == [b"b"]
    assert "releasing a corked output failed" in caplog.text
