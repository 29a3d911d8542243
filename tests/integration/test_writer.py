"""The GroupCommitWriter on a real SQLite file: commit before result, savepoints per job,
storage failures, concurrency with readers and with another process's writes, shutdown.

Batching is made deterministic without timing: a "gate" job holds the writer thread inside
one batch while the test queues more jobs, which the writer then takes as the next batch.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import pytest

from chatserver.domain import NewMessage
from chatserver.errors import InvalidRequest, NameTaken, ShuttingDown, StorageUnavailable
from chatserver.storage.database import Database
from chatserver.storage.writer import GroupCommitWriter

from .conftest import add

WAIT = 30  # seconds; only a bound on hangs, never an assertion about speed


def raw(db: Database, sql: str, params: tuple = ()) -> list[tuple]:
    """What another connection (another process) sees: committed data only."""
    conn = sqlite3.connect(db.path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def names_in_db(db: Database) -> list[str]:
    return [r[0] for r in raw(db, "SELECT name FROM accounts ORDER BY id")]



class Gate:
    """A job that blocks the writer thread until ``open()``."""

    def __init__(self):
        self.entered = threading.Event()
        self._release = threading.Event()

    def __call__(self, repo):
        self.entered.set()
        if not self._release.wait(WAIT):
            raise RuntimeError("gate never opened")
        return "gate"

    def open(self):
        self._release.set()


@pytest.fixture
def batches(db) -> Iterator[tuple[GroupCommitWriter, list[int]]]:
    """A writer that records the size of every committed batch."""
    sizes: list[int] = []
    w = GroupCommitWriter(db.write_engine, on_commit=lambda n, _seconds: sizes.append(n))
    yield w, sizes
    w.close()


def hold(writer: GroupCommitWriter) -> tuple[Gate, Future]:
    gate = Gate()
    future = writer.submit(gate)
    assert gate.entered.wait(WAIT)
    return gate, future


# -- results only after commit --------------------------------------------------------------

def test_result_is_committed_when_the_future_resolves(db, writer):
    account_id = writer.run(add("Alice"))
    assert raw(db, "SELECT id, name FROM accounts") == [(account_id, "Alice")]


def test_future_is_not_resolved_before_its_batch_commits(db, batches):
    writer, sizes = batches
    gate, gate_future = hold(writer)
    inner = Gate()
    try:
        first = writer.submit(add("Alice"))
        blocker = writer.submit(inner)
        gate.open()
        assert gate_future.result(WAIT) == "gate"
        assert inner.entered.wait(WAIT)
        # Alice's insert has run inside the open transaction, but not committed:
        assert not first.done()
        assert names_in_db(db) == []
    finally:
        gate.open()
        inner.open()
    alice_id = first.result(WAIT)
    assert blocker.result(WAIT) == "gate"
    assert raw(db, "SELECT id, name FROM accounts") == [(alice_id, "Alice")]
    assert sizes == [1, 2]


def test_idle_says_whether_a_job_is_queued_or_being_written(writer):
    """The server's loop polls for requests only while this says so (eventloop.py)."""
    assert writer.idle
    gate, future = hold(writer)
    queued = writer.submit(add("Alice"))
    assert not writer.idle
    gate.open()
    assert future.result(WAIT) == "gate"
    queued.result(WAIT)
    deadline = time.monotonic() + WAIT  # the count drops just after the futures resolve
    while not writer.idle and time.monotonic() < deadline:
        time.sleep(0.001)
    assert writer.idle


# -- one refused job does not undo the others -----------------------------------------------

def test_refused_jobs_do_not_undo_their_batch(db, batches):
    writer, sizes = batches

    def insert_then_refuse(repo):
        repo.add_account("Partial", "partial", "h", 1)
        raise InvalidRequest("refused after writing")

    def insert_then_crash(repo):
        repo.add_account("Crash", "crash", "h", 1)
        raise ValueError("a bug in a job")

    gate, _ = hold(writer)
    try:
        futures = [
            writer.submit(add("Alice")),
            writer.submit(add("ALICE")),  # sees Alice's uncommitted row in the same batch
            writer.submit(insert_then_refuse),
            writer.submit(add("Bob")),
            writer.submit(insert_then_crash),
            writer.submit(add("Carol")),
        ]
    finally:
        gate.open()

    alice_id = futures[0].result(WAIT)
    with pytest.raises(NameTaken):
        futures[1].result(WAIT)
    with pytest.raises(InvalidRequest, match="refused after writing"):
        futures[2].result(WAIT)
    bob_id = futures[3].result(WAIT)
    with pytest.raises(ValueError, match="a bug in a job"):
        futures[4].result(WAIT)
    carol_id = futures[5].result(WAIT)

    assert sizes == [1, 6]  # they really were one batch
    assert raw(db, "SELECT id, name FROM accounts ORDER BY id") == [
        (alice_id, "Alice"), (bob_id, "Bob"), (carol_id, "Carol")]


def test_cancelled_job_is_not_run(db, writer):
    gate, _ = hold(writer)
    try:
        cancelled = writer.submit(add("Never"))
        assert cancelled.cancel()
        kept = writer.submit(add("Kept"))
    finally:
        gate.open()
    kept.result(WAIT)
    assert names_in_db(db) == ["Kept"]


# -- storage failures -----------------------------------------------------------------------

def test_storage_failure_fails_the_whole_batch_and_the_writer_goes_on(db, batches):
    writer, sizes = batches

    def broken(repo):  # a real OperationalError from SQLite
        repo.conn.exec_driver_sql("INSERT INTO no_such_table VALUES (1)")

    gate, gate_future = hold(writer)
    try:
        futures = [writer.submit(add("Alice")), writer.submit(broken), writer.submit(add("Bob"))]
    finally:
        gate.open()
    assert gate_future.result(WAIT) == "gate"
    for future in futures:
        with pytest.raises(StorageUnavailable) as err:
            future.result(WAIT)
        assert err.value.code == "storage_unavailable"
    assert names_in_db(db) == []  # Alice and Bob ran, but their transaction was rolled back

    later = writer.run(add("Carol"))
    assert raw(db, "SELECT id, name FROM accounts") == [(later, "Carol")]
    assert sizes == [1, 1]  # the failed batch never committed


def test_disk_full_fails_the_batch_and_the_writer_recovers(db, writer):
    def fill_the_disk(repo):
        # Cap the file at its current size: the next page it needs is "disk full" (SQLITE_FULL).
        pages = repo.conn.exec_driver_sql("PRAGMA page_count").scalar()
        repo.conn.exec_driver_sql(f"PRAGMA max_page_count = {pages}")
        return pages

    writer.run(fill_the_disk)
    gate, _ = hold(writer)
    try:
        big = writer.submit(lambda repo: repo.add_account("Big", "big", "h" * 200_000, 1))
        small = writer.submit(add("Small"))
    finally:
        gate.open()
    for future in (big, small):
        # (SQLite rolls the whole transaction back itself on SQLITE_FULL, so the error the
        # writer reports is about the vanished savepoint; the outcome is what matters here.)
        with pytest.raises(StorageUnavailable):
            future.result(WAIT)
    assert names_in_db(db) == []

    # Space comes back; the same writer works again without a restart.
    writer.run(lambda repo: repo.conn.exec_driver_sql("PRAGMA max_page_count = 1073741823"))
    writer.run(lambda repo: repo.add_account("Big", "big", "h" * 200_000, 1))
    assert names_in_db(db) == ["Big"]


def open_temp_files() -> list[str]:
    """Files SQLite created in the temp directory that this process still has open (it
    unlinks them at once, so only /proc/self/fd shows them)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if "etilqs_" in target:  # SQLite's prefix for temp files
            found.append(target)
    return found


class Bounded:
    """A job that says how many existing pages it changes, as a send does."""

    def __init__(self, run, journal_pages: int = 2):
        self.run = run
        self.journal_pages = journal_pages

    def __call__(self, repo):
        return self.run(repo)


def temp_store(repo) -> int:
    return repo.conn.exec_driver_sql("PRAGMA temp_store").scalar()  # 0 default, 2 memory


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
@pytest.mark.parametrize("bounded", [True, False], ids=["bounded", "unbounded"])
def test_only_a_bounded_batch_keeps_its_sub_journal_in_memory(db, writer, bounded):
    """A savepoint (and a multi-row statement) keeps the original of every page it changes,
    to undo it; past 64 KiB SQLite writes that sub-journal to a temp file. A batch of jobs
    that bound the pages they change (sends) keeps it in memory; any other job (deleting an
    account's queue of 64 KiB messages, say) keeps it in a file, whatever its size."""
    sender = writer.run(lambda repo: repo.add_account("Sender", "sender", "h", 1))
    reader = writer.run(lambda repo: repo.add_account("Reader", "reader", "h", 1))
    batch = [NewMessage(sender, "reader", "Reader", "x" * 1000, 1, f"m{i}") for i in range(300)]
    ids = [o.message_id for o in writer.run(lambda repo: repo.store_messages(batch))]

    def delete_then_look(repo):
        # ~75 pages that existed before the savepoint change: ~300 KiB to journal.
        deleted = repo.delete_messages(reader.id, ids)
        # A sub-journal file stays open until the transaction ends.
        return deleted, open_temp_files(), temp_store(repo)

    job = Bounded(delete_then_look) if bounded else delete_then_look
    deleted, temp_files, setting = writer.run(job)
    assert deleted == 300
    assert raw(db, "SELECT count(*) FROM messages") == [(0,)]
    if bounded:
        assert (temp_files, setting) == ([], 2)
    else:
        assert len(temp_files) == 1 and setting == 0


def test_a_batch_over_the_bound_keeps_its_sub_journal_in_a_file(writer):
    from chatserver.storage.writer import MEMORY_JOURNAL_PAGES

    assert writer.run(Bounded(temp_store, MEMORY_JOURNAL_PAGES)) == 2
    assert writer.run(Bounded(temp_store, MEMORY_JOURNAL_PAGES + 1)) == 0
    gate, _ = hold(writer)  # two bounded jobs in one batch: their pages add up
    try:
        halves = [writer.submit(Bounded(temp_store, MEMORY_JOURNAL_PAGES // 2 + 1))
                  for _ in range(2)]
    finally:
        gate.open()
    assert [f.result(WAIT) for f in halves] == [0, 0]


# -- concurrency ----------------------------------------------------------------------------

def run_threads(targets) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # every exception is a failure here
                errors.append(exc)
        return run

    threads = [threading.Thread(target=guarded(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return errors


def test_many_writer_threads_and_readers(db, writer):
    threads, writes = 20, 50
    inbox = writer.run(lambda repo: repo.add_account("inbox", "inbox", "h", 1))
    senders = [writer.run(lambda repo, i=i: repo.add_account(f"s{i}", f"s{i}", "h", 1))
               for i in range(threads)]
    writers_done = threading.Event()
    observed: list[list[int]] = []

    def write(sender):
        def run():
            for j in range(writes):
                writer.run(lambda repo, j=j: repo.add_message(sender, inbox.id, f"{sender.name}:{j}", j))
        return run

    def read():
        counts: list[int] = []
        observed.append(counts)
        while not writers_done.is_set() or len(counts) < 5:
            counts.append(db.read(lambda repo: repo.count_undelivered(inbox.id)))
            page = db.read(lambda repo: repo.undelivered(inbox.id, 50))
            assert [m.id for m in page] == sorted(m.id for m in page)

    def all_writes():
        try:
            errors = run_threads([write(s) for s in senders])
            assert not errors, errors
        finally:
            writers_done.set()

    errors = run_threads([all_writes] + [read] * 4)
    assert not errors, errors

    stored = db.read(lambda repo: repo.undelivered(inbox.id, 10_000))
    assert len(stored) == threads * writes
    assert sorted(m.body for m in stored) == sorted(
        f"s{i}:{j}" for i in range(threads) for j in range(writes))
    # Each sender's messages carry increasing ids in the order it sent them.
    for sender in senders:
        mine = [int(m.body.split(":")[1]) for m in stored if m.sender == sender.name]
        assert mine == list(range(writes))
    # Every reader saw committed counts that only grew.
    for counts in observed:
        assert counts == sorted(counts)
        assert counts[-1] <= threads * writes


def test_another_process_writes_while_the_writer_runs(db, writer):
    """A second Database on the same file (as `chat admin` is) writes through its own units
    of work, each a read-then-write transaction, while the writer is busy."""
    other = Database(db.path)
    try:
        inbox = writer.run(lambda repo: repo.add_account("inbox", "inbox", "h", 1))
        server_side = writer.run(lambda repo: repo.add_account("srv", "srv", "h", 1))
        with other.unit_of_work() as uow:
            admin_side = uow.repo.add_account("adm", "adm", "h", 1)
            uow.commit()

        def through_writer(t):
            def run():
                for j in range(40):
                    writer.run(lambda repo, j=j: repo.add_message(server_side, inbox.id, f"w{t}:{j}", j))
            return run

        def through_other_database(t):
            def run():
                for j in range(25):
                    with other.unit_of_work() as uow:
                        before = uow.repo.count_undelivered(inbox.id)  # read, then write
                        uow.repo.add_message(admin_side, inbox.id, f"o{t}:{j}", before)
                        uow.repo.record_login(admin_side.id, j)
                        uow.commit()
            return run

        errors = run_threads([through_writer(t) for t in range(6)]
                             + [through_other_database(t) for t in range(3)])
        assert not errors, errors  # above all: no "database is locked"

        stored = db.read(lambda repo: repo.undelivered(inbox.id, 10_000))
        assert sorted(m.body for m in stored) == sorted(
            [f"w{t}:{j}" for t in range(6) for j in range(40)]
            + [f"o{t}:{j}" for t in range(3) for j in range(25)])
        assert len({m.id for m in stored}) == len(stored)
    finally:
        other.dispose()


# -- shutdown -------------------------------------------------------------------------------

def test_close_finishes_queued_jobs(db):
    writer = GroupCommitWriter(db.write_engine)
    futures = [writer.submit(add(f"user{i}")) for i in range(25)]
    writer.close()
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == sorted(f.result() for f in futures)
    assert len(names_in_db(db)) == 25


def test_close_is_idempotent_and_later_submits_are_refused(db):
    writer = GroupCommitWriter(db.write_engine)
    writer.run(add("Alice"))
    writer.close()
    writer.close()
    with pytest.raises(ShuttingDown) as err:
        writer.submit(add("Bob"))
    assert err.value.code == "shutting_down"
    with pytest.raises(ShuttingDown):
        writer.run(add("Bob"))
    assert names_in_db(db) == ["Alice"]


def test_close_from_many_threads_at_once(db):
    writer = GroupCommitWriter(db.write_engine)
    writer.run(add("Alice"))
    errors = run_threads([writer.close] * 8)
    assert errors == []
    with pytest.raises(ShuttingDown):
        writer.submit(add("Bob"))


def test_a_commits_reported_duration_includes_its_wait_for_another_process_lock(db, monkeypatch):
    """``on_commit`` (the chat_commit_seconds metric) gets the time from before BEGIN, so a
    commit that waited for another process's write lock reports the wait too. The writer's
    clock is a fake one the test moves while the writer waits, so nothing here is timed."""
    import chatserver.storage.writer as writer_module

    now = [100.0]
    read = threading.Event()

    class FakeTime:
        @staticmethod
        def perf_counter():
            read.set()
            return now[0]

    monkeypatch.setattr(writer_module, "time", FakeTime)
    reported: list[float] = []
    writer = GroupCommitWriter(db.write_engine,
                               on_commit=lambda _n, seconds: reported.append(seconds))
    other = sqlite3.connect(db.path, isolation_level=None)  # "chat admin", mid-write
    try:
        other.execute("BEGIN IMMEDIATE")
        future = writer.submit(add("waits"))
        assert read.wait(WAIT)  # the writer took its start time, and now waits for the lock
        now[0] += 5.0
        other.execute("COMMIT")
        assert isinstance(future.result(WAIT), int)
    finally:
        other.close()
        writer.close()
    assert reported == [5.0]
