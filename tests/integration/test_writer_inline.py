"""GroupCommitWriter.submit_callback(inline_if_idle=True): a job submitted while nothing else
is in flight is committed on the submitting thread; otherwise it queues for the writer
thread, after the jobs before it, so writes keep their submission order.

Made deterministic without timing: a "gate" job holds the writer thread inside a batch.
"""

from __future__ import annotations

import sqlite3
import threading

import pytest

from chatserver.storage.writer import GroupCommitWriter

WAIT = 30  # seconds; only a bound on hangs, never an assertion about speed


def committed_names(db) -> list[str]:
    """What another connection sees: committed rows only, in id order."""
    conn = sqlite3.connect(db.path)
    try:
        return [r[0] for r in conn.execute("SELECT name FROM accounts ORDER BY id")]
    finally:
        conn.close()


def add(name: str):
    def job(repo):
        return repo.add_account(name, name.casefold(), "h", 1).id
    return job


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
