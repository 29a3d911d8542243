"""GroupCommitWriter.submit_callback(inline_if_idle=True): a job submitted while nothing else
is in flight is committed on the submitting thread; otherwise it queues for the writer
thread, after the jobs before it, so writes keep their submission order.

Made deterministic without timing: a "gate" job holds the writer thread inside a batch.
"""

from __future__ import annotations

import sqlite3
import threading

import pytest

from chatserver.errors import ShuttingDown
from chatserver.storage.database import BUSY_TIMEOUT_MS
from chatserver.storage.writer import GroupCommitWriter

from .conftest import add, committed_names

WAIT = 30  # seconds; only a bound on hangs, never an assertion about speed




@pytest.fixture
def writer(db):
    w = GroupCommitWriter(db.write_engine)
    yield w
    w.close()


def test_idle_writer_commits_on_the_calling_thread_before_returning(db, writer):
    seen = {}

    def done(result, error):
        seen.update(thread=threading.get_ident(), result=result, error=error,
                    committed=committed_names(db))

    writer.submit_callback(add("alice"), done, inline_if_idle=True)
    # done has run already, on this thread, and the row was committed before it ran
    assert seen["thread"] == threading.get_ident()
    assert seen["error"] is None and isinstance(seen["result"], int)
    assert seen["committed"] == ["alice"]


def test_without_inline_the_job_goes_to_the_writer_thread(db, writer):
    finished = threading.Event()
    seen = {}

    def done(result, error):
        seen.update(thread=threading.get_ident(), error=error)
        finished.set()

    writer.submit_callback(add("bob"), done)  # inline_if_idle defaults to False
    assert finished.wait(WAIT)
    assert seen["thread"] != threading.get_ident() and seen["error"] is None
    assert committed_names(db) == ["bob"]


def test_a_busy_writer_queues_the_job_and_keeps_submission_order(db, writer):
    entered, release = threading.Event(), threading.Event()

    def gate(repo):
        entered.set()
        assert release.wait(WAIT)
        return repo.add_account("first", "first", "h", 1).id

    first = writer.submit(gate)
    assert entered.wait(WAIT)  # the writer thread is inside a batch: not idle
    finished = threading.Event()
    seen = {}

    def done(result, error):
        seen.update(thread=threading.get_ident(), error=error)
        finished.set()

    writer.submit_callback(add("second"), done, inline_if_idle=True)
    assert not finished.is_set()  # not committed inline, ahead of the job before it
    release.set()
    first.result(WAIT)
    assert finished.wait(WAIT)
    assert seen["thread"] != threading.get_ident() and seen["error"] is None
    assert committed_names(db) == ["first", "second"]


def test_inline_job_refused_reports_its_error_and_the_writer_goes_on(db, writer):
    results = []
    writer.submit_callback(add("carol"), lambda r, e: results.append(e), inline_if_idle=True)
    writer.submit_callback(add("Carol"), lambda r, e: results.append(e), inline_if_idle=True)
    assert results[0] is None
    assert type(results[1]).__name__ == "NameTaken"
    writer.run(add("dave"))  # the writer thread still works after inline commits
    assert committed_names(db) == ["carol", "dave"]


def test_write_lock_held_by_another_process_sends_the_job_to_the_writer_thread(db, writer):
    """An inline commit must never wait for another process's write lock (the caller is the
    I/O loop): the job goes to the writer thread, which waits, and commits it after."""
    other = sqlite3.connect(db.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # e.g. chat admin in the middle of a write
    try:
        finished = threading.Event()
        seen = {}

        def done(result, error):
            seen.update(thread=threading.get_ident(), error=error)
            finished.set()

        writer.submit_callback(add("erin"), done, inline_if_idle=True)
        # returned without waiting for the lock, and without committing
        assert not finished.is_set()
        other.execute("COMMIT")
        assert finished.wait(WAIT)
        assert seen["thread"] != threading.get_ident() and seen["error"] is None
        assert committed_names(db) == ["erin"]
        # and the next inline job, with the lock free, is committed inline again
        writer.submit_callback(add("frank"), lambda r, e: seen.update(again=threading.get_ident()),
                               inline_if_idle=True)
        assert seen["again"] == threading.get_ident()
    finally:
        other.close()


def test_close_while_an_inline_job_finds_the_lock_taken_refuses_it_and_says_so(db, writer):
    """close() may come between an inline job's failed BEGIN (another process holds the
    write lock) and its hand-over to the writer thread. The stop mark is then queued ahead
    of the job, so the thread would exit without it: the job is refused with ShuttingDown,
    and its callback still runs (a send's client gets an error, not silence)."""
    other = sqlite3.connect(db.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try_inline = writer._execute_inline
    closer = threading.Thread(target=writer.close)

    def fail_then_close(item):
        began = try_inline(item)  # really fails: the lock is taken
        closer.start()
        while not writer._closed:  # until close() has queued its stop mark
            closer.join(0.001)
        return began

    writer._execute_inline = fail_then_close
    finished = threading.Event()
    seen = {}

    def done(result, error):
        seen.update(result=result, error=error)
        finished.set()

    try:
        writer.submit_callback(add("gina"), done, inline_if_idle=True)
        closer.join(WAIT)
        assert not closer.is_alive()
        assert finished.wait(WAIT), "the job's callback never ran"
        assert isinstance(seen["error"], ShuttingDown)
        assert writer.idle
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert committed_names(db) == []


def busy_timeout(conn) -> int:
    return conn.exec_driver_sql("PRAGMA busy_timeout").scalar()


def test_after_inline_commits_the_writer_thread_still_waits_for_locks(db, writer):
    """An inline commit must not wait for another process's lock, so it runs with SQLite's
    busy timeout at 0; the writer thread's transactions wait as every connection does."""
    ran_on = []
    writer.submit_callback(add("gina"), lambda r, e: ran_on.append(threading.get_ident()),
                           inline_if_idle=True)
    assert ran_on == [threading.get_ident()]  # inline, with the timeout at 0
    assert writer.run(lambda repo: busy_timeout(repo.conn)) == BUSY_TIMEOUT_MS
    writer.submit_callback(add("hank"), lambda r, e: ran_on.append(threading.get_ident()),
                           inline_if_idle=True)
    assert ran_on[-1] == threading.get_ident()  # and inline again after it
    assert committed_names(db) == ["gina", "hank"]


class Bounded:
    """A job that says how many existing pages it changes, as a send does."""

    journal_pages = 2

    def __init__(self, run):
        self.run = run

    def __call__(self, repo):
        return self.run(repo)


def test_the_writer_connection_goes_back_to_the_pool_as_it_came(db):
    """Its busy timeout and temp store change; a unit of work that took it from the pool
    afterwards must not fail at once where it should wait for another process's lock, nor
    keep a big deletion's sub-journal in memory."""
    w = GroupCommitWriter(db.write_engine)
    inline_send = Bounded(add("ivan"))  # a send's job: sub-journal in memory, timeout 0
    w.submit_callback(inline_send, lambda r, e: None, inline_if_idle=True)
    w.close()
    pooled = db.write_engine.pool.checkedin()
    assert pooled >= 1  # the writer's, among them
    conns = [db.write_engine.raw_connection() for _ in range(pooled)]
    try:
        settings = [(c.driver_connection.execute("PRAGMA busy_timeout").fetchone()[0],
                     c.driver_connection.execute("PRAGMA temp_store").fetchone()[0])
                    for c in conns]
        assert settings == [(BUSY_TIMEOUT_MS, 0)] * pooled
    finally:
        for c in conns:
            c.close()
