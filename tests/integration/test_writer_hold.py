"""GroupCommitWriter.submit_callback(hold=True) and release_held(): jobs held by one thread
(the I/O loop, during a turn) are committed together when it releases them: in one
transaction on that thread if the writer is idle, else queued for the writer thread in
order. Anything else that thread submits goes after them.

What is committed is read from another connection; the writer's ``on_commit`` tells how
many jobs each commit held. Deterministic without timing: a gate holds the writer thread.
"""

from __future__ import annotations

import sqlite3
import threading

import pytest

from chatserver.domain import SendOutcome
from chatserver.errors import NoSuchAccount, ShuttingDown, StorageUnavailable
from chatserver.service import ChatService
from chatserver.storage.writer import GroupCommitWriter

from .conftest import PASSWORD, Held, add, break_commits, committed_names, trace_statements

WAIT = 30  # seconds; only a bound on hangs, never an assertion about speed




class Answers:
    """``done`` callbacks: (name, result, error, thread) in the order they ran."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.all_in = threading.Event()
        self.expected = 0

    def done(self, name: str):
        def call(result, error):
            self.calls.append((name, result, error, threading.get_ident()))
            if len(self.calls) >= self.expected:
                self.all_in.set()
        return call


@pytest.fixture
def commits():
    return []


@pytest.fixture
def writer(db, commits):
    w = GroupCommitWriter(db.write_engine, on_commit=lambda n, _s: commits.append(n))
    yield w
    w.close()


def test_held_jobs_wait_for_release_then_commit_together_on_this_thread(db, writer, commits):
    answers = Answers()
    for name in ("ann", "ben", "cy"):
        writer.submit_callback(add(name), answers.done(name), hold=True)
    assert answers.calls == [] and committed_names(db) == []
    assert not writer.idle  # held jobs are in flight
    writer.release_held()
    assert [c[0] for c in answers.calls] == ["ann", "ben", "cy"]
    assert all(c[2] is None and c[3] == threading.get_ident() for c in answers.calls)
    assert committed_names(db) == ["ann", "ben", "cy"]
    assert commits == [3]  # one transaction
    assert writer.idle
    writer.release_held()  # nothing held: nothing happens
    assert commits == [3]


def test_another_submission_of_the_holding_thread_goes_after_its_held_jobs(db, writer):
    answers = Answers()
    writer.submit_callback(add("first"), answers.done("first"), hold=True)
    writer.submit_callback(add("second"), answers.done("second"), hold=True)
    writer.run(add("third"))  # releases the held jobs first
    assert committed_names(db) == ["first", "second", "third"]
    writer.submit_callback(add("fourth"), answers.done("fourth"), hold=True)
    writer.submit_callback(add("fifth"), answers.done("fifth"), inline_if_idle=True)
    assert committed_names(db) == ["first", "second", "third", "fourth", "fifth"]


def test_another_threads_submission_does_not_release_what_this_one_holds(db, writer):
    answers = Answers()
    writer.submit_callback(add("held"), answers.done("held"), hold=True)
    other = threading.Thread(target=lambda: writer.run(add("other")))
    other.start()
    other.join(WAIT)
    assert committed_names(db) == ["other"] and answers.calls == []
    writer.release_held()
    assert committed_names(db) == ["other", "held"]


def test_held_jobs_released_while_the_writer_is_busy_queue_behind_its_work(db, writer, commits):
    answers = Answers()
    answers.expected = 2
    with Held(writer):  # the writer thread is inside a batch: not idle
        writer.submit_callback(add("x1"), answers.done("x1"), hold=True)
        writer.submit_callback(add("x2"), answers.done("x2"), hold=True)
        writer.release_held()
        assert answers.calls == []  # not committed here, ahead of the batch under way
    assert answers.all_in.wait(WAIT)
    assert [c[0] for c in answers.calls] == ["x1", "x2"]
    assert all(c[3] != threading.get_ident() for c in answers.calls)  # the writer's thread
    assert committed_names(db) == ["x1", "x2"]


def test_held_jobs_go_to_the_writer_thread_when_another_process_has_the_lock(db, writer):
    """Releasing must never wait for another process's write lock (the caller is the I/O
    loop): the jobs go to the writer thread, which waits for it and commits them after."""
    answers = Answers()
    answers.expected = 2
    other = sqlite3.connect(db.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        writer.submit_callback(add("y1"), answers.done("y1"), hold=True)
        writer.submit_callback(add("y2"), answers.done("y2"), hold=True)
        writer.release_held()  # returns at once, the lock being taken
        assert answers.calls == []
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert answers.all_in.wait(WAIT)
    assert [c[0] for c in answers.calls] == ["y1", "y2"]
    assert all(c[2] is None for c in answers.calls)
    assert committed_names(db) == ["y1", "y2"]


def test_held_jobs_released_after_close_are_refused_and_told(db):
    writer = GroupCommitWriter(db.write_engine)
    answers = Answers()
    writer.submit_callback(add("late"), answers.done("late"), hold=True)
    writer.close()
    writer.release_held()
    assert len(answers.calls) == 1 and isinstance(answers.calls[0][2], ShuttingDown)
    assert writer.idle
    with pytest.raises(ShuttingDown):
        writer.submit_callback(add("later"), answers.done("later"), hold=True)
    assert committed_names(db) == []


def test_a_refused_job_among_held_ones_fails_alone(db, writer):
    answers = Answers()
    writer.run(add("taken"))
    for name in ("new1", "Taken", "new2"):
        writer.submit_callback(add(name), answers.done(name), hold=True)
    writer.release_held()
    errors = {c[0]: c[2] for c in answers.calls}
    assert errors["new1"] is None and errors["new2"] is None
    assert type(errors["Taken"]).__name__ == "NameTaken"
    assert committed_names(db) == ["taken", "new1", "new2"]


def test_held_sends_are_stored_in_one_commit_with_each_its_own_outcome(db, writer, hasher,
                                                                        commits,
                                                                        sqlalchemy_commits):
    """Through the service, as the server holds a turn's lone sends: one commit, in order;
    an unknown recipient refuses only its own send."""
    service = ChatService(db, writer, hasher)
    alice = service.register("Alice", PASSWORD)
    bob = service.register("Bob", PASSWORD)
    answers = Answers()
    sends = [("Bob", "one", "c-1"), ("Nobody", "lost", ""), ("Bob", "two", "c-2"),
             ("Bob", "one again", "c-1")]
    for i, (to, body, client_msg_id) in enumerate(sends):
        service.submit_send(alice, to, body, client_msg_id, on_done=answers.done(str(i)),
                            hold=True)
    commits.clear()
    sqlalchemy_commits.clear()
    writer.release_held()
    assert commits == [4]
    assert sqlalchemy_commits == []  # committed on the driver (_commit_atomic)
    by_send = {int(c[0]): c for c in answers.calls}
    one, lost, two, again = (by_send[i] for i in range(4))
    assert type(one[1]) is SendOutcome and not one[1].duplicate
    assert isinstance(lost[2], NoSuchAccount)
    assert type(two[1]) is SendOutcome and two[1].message_id > one[1].message_id
    assert again[1].duplicate and again[1].message_id == one[1].message_id
    page, _more = service.fetch(bob, 10)
    assert [m.body for m in page] == ["one", "two"]


def test_a_failing_on_commit_hook_neither_loses_answers_nor_fails_committed_jobs(db):
    """on_commit (metrics) runs after the commit: if it raises, the jobs are still
    committed, and each is told its own result, inline and on the writer thread alike."""

    def broken(_jobs, _seconds):
        raise RuntimeError("metrics broke")

    writer = GroupCommitWriter(db.write_engine, on_commit=broken)
    try:
        answers = Answers()
        writer.submit_callback(add("held1"), answers.done("held1"), hold=True)
        writer.submit_callback(add("held2"), answers.done("held2"), hold=True)
        writer.release_held()  # does not raise
        assert [(c[0], c[2]) for c in answers.calls] == [("held1", None), ("held2", None)]
        assert writer.idle
        assert writer.submit(add("queued")).result(WAIT) is not None  # the writer thread
        assert committed_names(db) == ["held1", "held2", "queued"]
    finally:
        writer.close()


def test_a_failed_commit_of_held_sends_refuses_them_all_and_stores_nothing(
        db, writer, hasher, monkeypatch):
    """COMMIT itself fails (a deferred foreign key the transaction violated, checked only
    at COMMIT, as a full disk would fail it): every held send is refused, none is stored,
    and the next ones commit."""
    service = ChatService(db, writer, hasher)
    alice = service.register("Alice", PASSWORD)
    bob = service.register("Bob", PASSWORD)
    mend = break_commits(monkeypatch)
    answers = Answers()
    for i in range(3):
        service.submit_send(alice, "Bob", f"doomed {i}", f"c-{i}", on_done=answers.done(str(i)),
                            hold=True)
    writer.release_held()
    assert [type(c[2]) for c in answers.calls] == [StorageUnavailable] * 3
    assert writer.idle
    mend()
    for i in range(3):
        service.submit_send(alice, "Bob", f"kept {i}", f"c-{i}", on_done=answers.done(str(i)),
                            hold=True)
    writer.release_held()
    assert [c[2] for c in answers.calls[3:]] == [None] * 3
    assert not any(c[1].duplicate for c in answers.calls[3:])  # nothing of the first kept
    page, _more = service.fetch(bob, 10)
    assert [m.body for m in page] == ["kept 0", "kept 1", "kept 2"]


def test_held_sends_with_a_client_msg_id_of_an_earlier_commit_are_stored_again_with_savepoints(
        db, writer, hasher, commits, sqlalchemy_commits):
    """Held sends are stored without a savepoint; one that repeats an earlier commit's
    client_msg_id spoils the transaction, which is rolled back, and they are all stored
    again, in order, with savepoints, on this thread: two passes, no more. Each gets its
    own outcome, the repeat is a duplicate, and nothing is stored twice."""
    service = ChatService(db, writer, hasher)
    alice = service.register("Alice", PASSWORD)
    bob = service.register("Bob", PASSWORD)
    answers = Answers()
    answers.expected = 4
    service.submit_send(alice, "Bob", "one", "c-1", on_done=answers.done("first"), hold=True)
    writer.release_held()
    first = answers.calls[0][1]
    statements = trace_statements(writer)
    for name, body, client_msg_id in (("a", "two", "c-2"), ("b", "one again", "c-1"),
                                      ("c", "three", "c-3")):
        service.submit_send(alice, "Bob", body, client_msg_id, on_done=answers.done(name),
                            hold=True)
    commits.clear()
    sqlalchemy_commits.clear()
    writer.release_held()
    assert answers.all_in.is_set()  # answered before release_held returned
    assert [c[0] for c in answers.calls[1:]] == ["a", "b", "c"]
    assert all(c[2] is None for c in answers.calls)
    assert all(c[3] == threading.get_ident() for c in answers.calls)
    two, again, three = (c[1] for c in answers.calls[1:])
    assert again.duplicate and again.message_id == first.message_id
    assert not two.duplicate and not three.duplicate
    assert first.message_id < two.message_id < three.message_id
    assert commits == [3] and sqlalchemy_commits == [1]
    assert statements.count("BEGIN IMMEDIATE") == 2 and statements.count("ROLLBACK") == 1
    assert statements[-1] == "COMMIT" and any(s.startswith("SAVEPOINT") for s in statements)
    page, _more = service.fetch(bob, 10)
    assert [m.body for m in page] == ["one", "two", "three"]
