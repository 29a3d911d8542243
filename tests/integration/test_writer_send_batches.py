"""A writer thread's batch that is one group of sends is committed as an inline send is
(``GroupCommitWriter._commit_atomic``): BEGIN and COMMIT on the driver, without SQLAlchemy's
transaction object or savepoints; if a send repeats an earlier commit's client_msg_id the
transaction is rolled back and the batch stored again with savepoints. ``begin_now`` and
``try_begin_now`` against another connection's lock.

Batches are formed deterministically: a gate (``Held``) keeps the writer thread busy while
the sends queue up behind it. What is committed is read from another connection.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager

import pytest

from chatserver.errors import StorageUnavailable
from chatserver.storage.database import (
    begin_now,
    rollback_begun,
    try_begin_now,
    wait_for_locks,
)
from chatserver.storage.writer import GroupCommitWriter
from tests.e2e.helpers import wait_until

from .conftest import Held, break_commits, committed_bodies

WAIT = 30  # seconds; only a bound on hangs


def test_a_batch_of_sends_commits_on_the_driver_each_with_its_outcome(
        db, service, writer, alice, bob, sqlalchemy_commits):
    with Held(writer):
        futures = [service.submit_send(alice, "Bob", f"m{i}", f"c-{i}") for i in range(3)]
        futures.append(service.submit_send(alice, "Nobody", "lost"))
    outcomes = [f.result(WAIT) for f in futures[:3]]
    assert [o.duplicate for o in outcomes] == [False] * 3
    assert outcomes[0].message_id < outcomes[1].message_id < outcomes[2].message_id
    assert type(futures[3].exception(WAIT)).__name__ == "NoSuchAccount"
    assert committed_bodies(db) == ["m0", "m1", "m2"]
    assert sqlalchemy_commits == [1]  # the gate's own batch; the sends' went on the driver


def test_a_repeated_client_msg_id_in_a_batch_is_stored_again_with_savepoints(
        db, service, writer, alice, bob, sqlalchemy_commits):
    first = service.send(alice, "Bob", "once", "c-1")
    sqlalchemy_commits.clear()
    with Held(writer):
        futures = [service.submit_send(alice, "Bob", "new", "c-2"),
                   service.submit_send(alice, "Bob", "once again", "c-1")]
    new, again = (f.result(WAIT) for f in futures)
    assert not new.duplicate
    assert again.duplicate and again.message_id == first.message_id
    assert committed_bodies(db) == ["once", "new"]
    assert sqlalchemy_commits == [1, 1]  # the gate's batch, then the sends' with savepoints


def test_a_cancelled_send_in_a_batch_is_not_stored(db, service, writer, alice, bob):
    with Held(writer):
        futures = [service.submit_send(alice, "Bob", f"m{i}", f"c-{i}") for i in range(3)]
        assert futures[1].cancel()
    assert futures[0].result(WAIT) and futures[2].result(WAIT)
    assert futures[1].cancelled()
    assert committed_bodies(db) == ["m0", "m2"]


def test_begin_now_refuses_when_another_connection_holds_the_lock(db):
    other = sqlite3.connect(db.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with db.write_engine.connect() as conn:
            wait_for_locks(conn, False)  # a busy timeout of 0: no wait to sit out
            with pytest.raises(StorageUnavailable, match="locked"):
                begin_now(conn)
            assert try_begin_now(conn) is False
            assert not conn.connection.driver_connection.in_transaction
            other.execute("COMMIT")
            assert try_begin_now(conn) is True
            assert conn.connection.driver_connection.in_transaction
            rollback_begun(conn)
            assert not conn.connection.driver_connection.in_transaction
            wait_for_locks(conn, True)
    finally:
        other.close()


class Nothing:
    """The smallest all-or-nothing bulk job: writes nothing, one result per job."""

    bulk_is_atomic = True

    @staticmethod
    def run_bulk(_repo, jobs):
        return ["done"] * len(jobs)


@pytest.mark.parametrize("inline", [False, True])
def test_a_writer_thread_batch_is_resolved_corked_and_a_lone_inline_job_at_once(db, inline):
    """On the writer thread even a batch of one job (a chunk of pipelined sends) has its
    results resolved inside ``results_context``, so that its replies and pushes go out
    together; a lone job committed inline answers at once."""
    seen: list[str] = []
    answered = threading.Event()

    @contextmanager
    def corked():
        seen.append("cork")
        yield
        seen.append("uncork")

    def done(result, error):
        seen.append(f"{result} {error}")
        answered.set()

    writer = GroupCommitWriter(db.write_engine, results_context=corked)
    try:
        writer.submit_callback(Nothing(), done, inline_if_idle=inline)
        assert answered.wait(WAIT)
        wait_until(lambda: writer.idle, what="the writer idle")
    finally:
        writer.close()
    assert seen == (["done None"] if inline else ["cork", "done None", "uncork"])


def test_a_batch_of_sends_that_fills_the_disk_is_refused_and_lets_the_write_lock_go(
        db, service, writer, alice, bob):
    """SQLITE_FULL halfway through a writer thread's batch of sends (the connection's
    max_page_count stands in for a full disk): every send is refused, nothing of the batch
    is stored, and the dropped connection does not keep SQLite's write lock, even while
    the refusals are kept (their tracebacks hold the failed statement, which a close alone
    would wait for). The next send, on a new connection, is stored."""
    service.send(alice, "Bob", "warm", "c-0")
    pages = writer.run(lambda repo: repo.conn.exec_driver_sql("PRAGMA page_count").scalar())
    writer.run(lambda repo: repo.conn.exec_driver_sql(f"PRAGMA max_page_count = {pages + 3}"))
    with Held(writer):
        futures = [service.submit_send(alice, "Bob", "x" * 60_000, f"c-{i}") for i in (1, 2, 3)]
    errors = [future.exception(WAIT) for future in futures]  # kept alive on purpose
    assert all(isinstance(error, StorageUnavailable) for error in errors), errors
    wait_until(lambda: writer.idle, what="the writer done with the failed batch")
    other = sqlite3.connect(db.path, timeout=0)
    try:
        other.execute("BEGIN IMMEDIATE")  # "database is locked" if the lock were kept
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert not service.send(alice, "Bob", "small", "c-9").duplicate
    assert committed_bodies(db) == ["warm", "small"]


def test_a_failed_commit_of_a_batch_of_sends_refuses_them_all_and_stores_nothing(
        db, service, writer, alice, bob, monkeypatch):
    """COMMIT itself fails on the writer thread (a deferred foreign key the transaction
    violated, as a full disk or an I/O error would fail it)."""
    mend = break_commits(monkeypatch)
    with Held(writer):
        futures = [service.submit_send(alice, "Bob", f"doomed {i}", f"c-{i}") for i in range(3)]
    assert all(isinstance(f.exception(WAIT), StorageUnavailable) for f in futures)
    assert committed_bodies(db) == []
    mend()
    with Held(writer):
        futures = [service.submit_send(alice, "Bob", f"kept {i}", f"c-{i}") for i in range(3)]
    assert not any(f.result(WAIT).duplicate for f in futures)  # nothing of the first kept
    assert committed_bodies(db) == ["kept 0", "kept 1", "kept 2"]
