"""ChatService.submit_sends: a connection's pipelined sends as few writer jobs, in order.

Each send gets exactly one answer: an immediate refusal (no database needed), or its
outcome or refusal through ``on_done`` after the commit; the database sees them in order.
"""

from __future__ import annotations

import threading

import pytest

from chatserver.domain import SendOutcome
from chatserver.errors import (
    EmptyMessage,
    MessageTooLarge,
    NoSuchAccount,
    RateLimited,
    ShuttingDown,
)
from chatserver.limits import RateLimiter
from chatserver.service import ChatService
from chatserver.storage.repository import Repository

from .conftest import PASSWORD, Held

WAIT = 30


class Answers:
    """Collects on_done calls; ``wait(n)`` until n sends are answered."""

    def __init__(self):
        self.calls: list[tuple[list[int], list | None, BaseException | None]] = []
        self.by_index: dict[int, object] = {}
        self._changed = threading.Condition()

    def __call__(self, indexes, results, error):
        with self._changed:
            self.calls.append((list(indexes), results, error))
            for position, index in enumerate(indexes):
                assert index not in self.by_index, "answered twice"
                self.by_index[index] = error if error is not None else results[position]
            self._changed.notify_all()

    def wait(self, count: int) -> dict[int, object]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.by_index) >= count, WAIT)
        return self.by_index


def bodies(service, account) -> list[str]:
    page, _ = service.fetch(account, 100)
    return [m.body for m in page]


def test_each_send_is_answered_once_in_order(service, alice, bob):
    sends = [("Bob", "one", "c-1"), ("Bob", "x" * 70_000, ""), ("Nobody", "lost", ""),
             ("Bob", "", ""), ("bob", "two", "c-2"), ("BOB", "one again", "c-1"),
             ("Bob", "three", "")]
    answers = Answers()
    refusals = service.submit_sends(alice, sends, answers)
    assert [type(r) for r in refusals] == [type(None), MessageTooLarge, type(None),
                                           EmptyMessage, type(None), type(None), type(None)]
    got = answers.wait(5)
    assert sorted(got) == [0, 2, 4, 5, 6]
    assert isinstance(got[2], NoSuchAccount)
    one, two, again, three = got[0], got[4], got[5], got[6]
    assert all(isinstance(o, SendOutcome) for o in (one, two, again, three))
    assert (again.message_id, again.duplicate) == (one.message_id, True)
    assert one.message_id < two.message_id < three.message_id
    assert bodies(service, bob) == ["one", "two", "three"]
    # One writer job for the whole chunk: a single completion answers every queued send.
    assert len(answers.calls) == 1


def test_a_retry_over_the_rate_waits_for_the_sends_before_it(db, writer, hasher, clock):
    service = ChatService(db, writer, hasher, clock=clock.now,
                          send_limiter=RateLimiter(rate=0.001, burst=3))
    alice = service.register("Alice", PASSWORD)
    bob = service.register("Bob", PASSWORD)
    sends = [("Bob", "a", "k-a"), ("Bob", "b", "k-b"), ("Bob", "c", ""),
             ("Bob", "over the rate", ""),          # refused at once: no id to retry by
             ("Bob", "a", "k-a"),                   # a retry of the first, in this chunk
             ("Bob", "new over the rate", "k-z")]   # over the rate and not a retry
    answers = Answers()
    refusals = service.submit_sends(alice, sends, answers)
    assert [type(r).__name__ for r in refusals] == [
        "NoneType", "NoneType", "NoneType", "RateLimited", "NoneType", "NoneType"]
    got = answers.wait(5)
    first, retry, refused = got[0], got[4], got[5]
    assert (retry.message_id, retry.duplicate) == (first.message_id, True)
    assert isinstance(refused, RateLimited) and refused.retry_after_ms > 0
    assert bodies(service, bob) == ["a", "b", "c"]
    # The three sends in one job, then each retry job on its own, in that order.
    assert [call[0] for call in answers.calls] == [[0, 1, 2], [4], [5]]


def test_a_closed_writer_refuses_every_send_at_once(service, writer, alice, bob):
    writer.close()
    answers = Answers()
    refusals = service.submit_sends(alice, [("Bob", "a", ""), ("Bob", "b", "k")], answers)
    assert all(isinstance(r, ShuttingDown) for r in refusals)
    assert answers.calls == []


@pytest.mark.parametrize("count", [1, 2, 300])
def test_chunks_of_any_size(service, alice, bob, count):
    answers = Answers()
    refusals = service.submit_sends(
        alice, [("Bob", f"m{i}", f"c{i}") for i in range(count)], answers)
    assert refusals == [None] * count
    got = answers.wait(count)
    ids = [got[i].message_id for i in range(count)]
    assert ids == sorted(ids) and len(set(ids)) == count
    assert bodies(service, bob) == [f"m{i}" for i in range(min(count, 100))]


def test_lone_sends_and_chunks_in_one_commit_are_stored_together_in_order(
        service, writer, alice, bob, monkeypatch):
    """A lone send and chunks queued behind one another form one group of the writer's
    batch (one store_messages): every send keeps its own outcome and the ids follow the
    order in which they were queued."""
    carol = service.register("Carol", PASSWORD)
    calls = []
    real_store = Repository.store_messages

    def counted(repo, batch, cap=0):
        calls.append(len(batch))
        return real_store(repo, batch, cap)

    monkeypatch.setattr(Repository, "store_messages", counted)
    first_chunk, second_chunk = Answers(), Answers()
    with Held(writer):
        lone = service.submit_send(alice, "Bob", "lone 1", client_msg_id="l-1")
        service.submit_sends(alice, [("Bob", "chunk 1a", "k-1"), ("Nobody", "x", ""),
                                     ("Carol", "chunk 1b", "")], first_chunk)
        lone_2 = service.submit_send(carol, "Bob", "lone 2")
        service.submit_sends(carol, [("Bob", "chunk 2a", ""), ("Bob", "chunk 2b", "l-1")],
                             second_chunk)
    one, two = first_chunk.wait(3), second_chunk.wait(2)
    first, second = lone.result(WAIT), lone_2.result(WAIT)
    assert calls == [7]  # one group: 2 lone sends and 5 in chunks
    assert isinstance(one[1], NoSuchAccount)
    order = [first.message_id, one[0].message_id, one[2].message_id, second.message_id,
             two[0].message_id, two[1].message_id]
    assert order == sorted(order) and len(set(order)) == 6
    assert two[1].duplicate is False  # "l-1" is Alice's client id, not Carol's
    page, _ = service.fetch(bob, 100)
    assert [m.body for m in page] == ["lone 1", "chunk 1a", "lone 2", "chunk 2a", "chunk 2b"]
    assert [m.sender for m in page] == ["Alice", "Alice", "Carol", "Carol", "Carol"]


def test_sends_keep_their_sub_journal_in_memory(service, alice, bob, monkeypatch):
    """Lone and pipelined sends alike: their transactions keep SQLite's sub-journal in
    memory (a temp file per commit otherwise; see writer._small_journal)."""
    seen = []
    store = Repository.store_messages

    def spy(self, batch, cap=0):
        seen.append(self.conn.exec_driver_sql("PRAGMA temp_store").scalar())
        return store(self, batch, cap)

    monkeypatch.setattr(Repository, "store_messages", spy)
    lone = Answers()
    service.submit_send(alice, "Bob", "lone", "", inline_if_idle=True,
                        on_done=lambda outcome, error: lone([0], [outcome], error))
    lone.wait(1)
    answers = Answers()
    service.submit_sends(alice, [("Bob", f"m{i}", f"c{i}") for i in range(5)], on_done=answers)
    answers.wait(5)
    assert seen == [2, 2]
    assert bodies(service, bob) == ["lone", "m0", "m1", "m2", "m3", "m4"]
