"""GroupCommitWriter.submit_callback on a real SQLite file: ``done`` only after the commit,
on the writer's thread; refused jobs, failing callbacks, shutdown, and ``results_context``.

As in test_writer.py, a "gate" job holds the writer thread inside one batch while the test
queues more jobs, which the writer then takes together as the next batch.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

import pytest

from chatserver.errors import InvalidRequest, ShuttingDown, StorageUnavailable
from chatserver.sessions import Output, corked
from chatserver.storage.writer import GroupCommitWriter
from tests.integration.test_writer import WAIT, add, hold, names_in_db, raw


class Done:
    """A ``done`` callback that records its call, and what ``inspect()`` saw at that moment."""

    def __init__(self, inspect: Callable[[], object] = lambda: None):
        self.inspect = inspect
        self.called = threading.Event()
        self.calls: list[tuple] = []
        self.thread: threading.Thread | None = None
        self.seen: object = None

    def __call__(self, result, exception) -> None:
        self.thread = threading.current_thread()
        self.seen = self.inspect()
        self.calls.append((result, exception))
        self.called.set()

    def wait(self) -> tuple:
        assert self.called.wait(WAIT), "done was never called"
        assert len(self.calls) == 1, self.calls
        return self.calls[0]


def refuse_after_insert(repo):
    repo.add_account("Partial", "partial", "h", 1)
    raise InvalidRequest("refused after writing")


def test_done_runs_on_the_writer_thread_after_the_commit(db, writer):
    """done(result, None) is called on the writer's thread, and by then another connection
    already sees the committed row."""
    done = Done(lambda: raw(db, "SELECT id, name FROM accounts"))
    gate, _ = hold(writer)  # the job goes through the writer thread's queue
    try:
        writer.submit_callback(add("Alice"), done)
        assert not done.called.is_set()
    finally:
        gate.open()
    account_id, exception = done.wait()
    assert exception is None
    assert isinstance(account_id, int)
    assert done.thread.name == "db-writer"
    assert done.seen == [(account_id, "Alice")]


def test_done_sees_the_commit_when_the_writer_was_idle(db, writer):
    """With nothing else being written, done is still called only once the row is
    committed (whichever thread runs it), and exactly once."""
    done = Done(lambda: names_in_db(db))
    writer.submit_callback(add("Alice"), done)
    _result, exception = done.wait()
    assert exception is None
    assert done.seen == ["Alice"]
    writer.run(add("Bob"))  # a later batch does not call it again
    assert len(done.calls) == 1


def test_refused_job_gets_its_exception_and_the_batch_is_unaffected(db, writer):
    """A job raising a ChatError gets done(None, exc) with its own exception and its writes
    undone; the other jobs of the same batch get their results and are committed."""
    gate, _ = hold(writer)
    dones = [Done(), Done(), Done(), Done()]
    try:
        writer.submit_callback(add("Alice"), dones[0])
        writer.submit_callback(refuse_after_insert, dones[1])
        writer.submit_callback(lambda repo: 1 / 0, dones[2])  # a bug, not a refusal
        writer.submit_callback(add("Bob"), dones[3])
    finally:
        gate.open()
    alice_id, alice_error = dones[0].wait()
    refused_result, refused_error = dones[1].wait()
    crashed_result, crashed_error = dones[2].wait()
    bob_id, bob_error = dones[3].wait()

    assert (alice_error, bob_error) == (None, None)
    assert refused_result is None
    assert isinstance(refused_error, InvalidRequest)
    assert refused_error.message == "refused after writing"
    assert crashed_result is None
    assert isinstance(crashed_error, ZeroDivisionError)
    assert raw(db, "SELECT id, name FROM accounts ORDER BY id") == [
        (alice_id, "Alice"), (bob_id, "Bob")]


def test_a_raising_callback_does_not_stop_the_others(db, writer, caplog):
    """A done callback that raises is logged; the later callbacks of the batch still run and
    the writer goes on."""
    caplog.set_level(logging.ERROR, logger="chatserver.storage.writer")

    def broken_done(result, exception):
        raise RuntimeError("broken callback")

    gate, _ = hold(writer)
    after = Done()
    try:
        writer.submit_callback(add("Alice"), broken_done)
        writer.submit_callback(add("Bob"), after)
    finally:
        gate.open()
    bob_id, exception = after.wait()
    assert exception is None
    assert names_in_db(db) == ["Alice", "Bob"]
    failures = [r for r in caplog.records if "a write job's callback failed" in r.getMessage()]
    assert len(failures) == 1
    assert str(failures[0].exc_info[1]) == "broken callback"

    assert writer.run(add("Carol")) > bob_id  # the writer still serves


def test_storage_failure_calls_every_done_with_storage_unavailable(db, writer):
    """When the database fails the batch, every job's done gets StorageUnavailable and
    nothing of the batch is stored."""
    def broken(repo):
        repo.conn.exec_driver_sql("INSERT INTO no_such_table VALUES (1)")

    gate, _ = hold(writer)
    dones = [Done(), Done(), Done()]
    try:
        writer.submit_callback(add("Alice"), dones[0])
        writer.submit_callback(broken, dones[1])
        writer.submit_callback(add("Bob"), dones[2])
    finally:
        gate.open()
    for done in dones:
        result, exception = done.wait()
        assert result is None
        assert isinstance(exception, StorageUnavailable)
    assert names_in_db(db) == []


def test_submit_callback_after_close_is_refused(db):
    """After close(), submit_callback raises ShuttingDown; the job never runs and done is
    never called."""
    writer = GroupCommitWriter(db.write_engine)
    writer.run(add("Alice"))
    writer.close()
    done = Done()
    with pytest.raises(ShuttingDown):
        writer.submit_callback(add("Bob"), done)
    assert not done.called.is_set()
    assert names_in_db(db) == ["Alice"]


def test_close_calls_done_for_queued_callback_jobs(db):
    """Jobs queued with submit_callback before close() are committed and their done called
    before close() returns."""
    writer = GroupCommitWriter(db.write_engine)
    gate, _ = hold(writer)
    dones = [Done() for _ in range(5)]
    for i, done in enumerate(dones):
        writer.submit_callback(add(f"user{i}"), done)
    closer = threading.Thread(target=writer.close)
    closer.start()
    gate.open()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert all(done.called.is_set() for done in dones)
    assert all(done.calls[0][1] is None for done in dones)
    assert names_in_db(db) == [f"user{i}" for i in range(5)]


def test_results_context_is_entered_around_resolving_a_batch(db):
    """results_context is entered once per batch, after its commit, and every done of the
    batch is called inside it."""
    events: list[tuple] = []
    inside = [False]

    class Recording:
        def __enter__(self):
            inside[0] = True
            events.append(("enter", names_in_db(db)))

        def __exit__(self, *exc_info):
            inside[0] = False
            events.append(("exit",))
            return False

    writer = GroupCommitWriter(db.write_engine, results_context=Recording)
    try:
        gate, _ = hold(writer)

        def recording_done(name):
            def done(result, exception):
                events.append(("done", name, exception is None, inside[0]))
            return done

        try:
            writer.submit_callback(add("Alice"), recording_done("Alice"))
            writer.submit_callback(add("Bob"), recording_done("Bob"))
        finally:
            gate.open()
    finally:
        writer.close()  # finishes the batch, then stops the thread
    assert events == [
        ("enter", []), ("exit",),  # the gate's own batch (it writes nothing)
        ("enter", ["Alice", "Bob"]),  # committed before the context is entered
        ("done", "Alice", True, True),
        ("done", "Bob", True, True),
        ("exit",),
    ]


def test_corked_results_send_a_batchs_replies_in_one_go(db):
    """With corked as results_context (as the server wires it), the frames the callbacks of
    one batch write to a connection leave in one send, in the order of the jobs."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    sends: list[bytes] = []

    class Spy:
        def send(self, data):
            sent = ours.send(data)
            sends.append(bytes(data[:sent]))
            return sent

        def shutdown(self, how):
            ours.shutdown(how)

    output = Output(Spy(), on_blocked=lambda: None, on_failed=lambda: None)
    writer = GroupCommitWriter(db.write_engine, results_context=corked)
    try:
        gate, _ = hold(writer)
        finished = threading.Event()

        def reply(name, last=False):
            def done(result, exception):
                output.write(f"[{name}]".encode())
                if last:
                    finished.set()
            return done

        try:
            writer.submit_callback(add("Alice"), reply("Alice"))
            writer.submit_callback(add("Bob"), reply("Bob"))
            writer.submit_callback(add("Carol"), reply("Carol", last=True))
        finally:
            gate.open()
        assert finished.wait(WAIT)
    finally:
        writer.close()  # the batch's context has ended once the thread is gone
    try:
        assert sends == [b"[Alice][Bob][Carol]"]
        theirs.settimeout(WAIT)
        assert theirs.recv(100) == b"[Alice][Bob][Carol]"
    finally:
        ours.close()
        theirs.close()
