"""The WAL checkpointer on a real SQLite file: it copies committed frames into the database
file when poked, and the WAL stays bounded while a writer never pauses.

"In the database file" is observed by opening the file with ``immutable=1``: SQLite then
reads the main file alone and ignores the WAL, so a row shows there only once a checkpoint
has copied it.
"""

from __future__ import annotations

import os
import sqlite3

import pytest

from chatserver.storage.checkpointer import Checkpointer
from chatserver.storage.database import (
    AUTOCHECKPOINT_BYTES,
    NEW_DATABASE_PAGE_SIZE,
    SYNC_LEVELS,
    Database,
)
from chatserver.storage.migrate import ensure_schema
from chatserver.storage.writer import GroupCommitWriter
from tests.e2e.helpers import wait_until
from tests.sqlite_files import with_pages_of

PAGE = NEW_DATABASE_PAGE_SIZE  # of the databases these tests create


def names_in_main_file(path: str) -> set[str]:
    conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM accounts")}
    finally:
        conn.close()


def add(name: str, hash_size: int = 8):
    def job(repo):
        return repo.add_account(name, name.casefold(), "h" * hash_size, 1).id
    return job


def test_a_poke_copies_committed_rows_into_the_database_file(db):
    db.enable_wal()
    with sqlite3.connect(db.path) as conn:  # the schema itself into the file first
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    writer = GroupCommitWriter(db.write_engine)
    try:
        for name in ("ann", "bob", "cy"):
            writer.run(add(name))
        # Committed (in the WAL), far below the automatic checkpoint: not in the file yet.
        assert names_in_main_file(db.path) == set()
        checkpointer = Checkpointer(db.write_engine)
        try:
            checkpointer.poke()
            wait_until(lambda: names_in_main_file(db.path) == {"ann", "bob", "cy"},
                       what="the rows in the database file")
            assert checkpointer.checkpoints >= 1
        finally:
            checkpointer.close()
    finally:
        writer.close()


@pytest.fixture(params=SYNC_LEVELS)
def db_at_level(request, db_path):
    database = Database(db_path, sync=request.param)
    try:
        ensure_schema(database)
        yield database
    finally:
        database.dispose()


def test_connections_checkpoint_automatically_at_their_sync_levels_threshold(db_at_level):
    """~4 MiB of WAL at full (SQLite's default of 1,000 pages of 4 KiB); ~64 MiB at normal,
    where the checkpoint's syncs are the only ones a commit pays. In pages of the file's
    size: 4,000 and 64,000 for a new database's 1 KiB pages. Every connection of both
    pools has it, those opened before the new file got its page size included."""
    assert AUTOCHECKPOINT_BYTES == {"full": 4_096_000, "normal": 65_536_000}
    expected = {"full": 4000, "normal": 64000}[db_at_level.sync]
    for engine in (db_at_level.write_engine, db_at_level.read_engine):
        with engine.connect() as conn:
            raw = conn.connection.driver_connection
            assert raw.execute("PRAGMA page_size").fetchone()[0] == 1024
            assert raw.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == expected


@pytest.mark.parametrize("sync", SYNC_LEVELS)
def test_a_database_of_4_kib_pages_checkpoints_at_the_same_size(tmp_path, sync):
    """An older database keeps SQLite's 4 KiB pages: 1,000 and 16,000 of them."""
    path = with_pages_of(str(tmp_path / "old.db"), 4096)
    db = Database(path, sync=sync)
    try:
        db.enable_wal()
        with db.write_engine.connect() as conn:
            raw = conn.connection.driver_connection
            assert raw.execute("PRAGMA page_size").fetchone()[0] == 4096
            assert raw.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == \
                {"full": 1000, "normal": 16000}[sync]
    finally:
        db.dispose()


@pytest.mark.parametrize("sync", SYNC_LEVELS)
def test_the_wal_stays_bounded_while_the_writer_never_pauses(db_path, monkeypatch, sync):
    """A passive checkpoint alone never lets the WAL restart under a writer that never
    pauses; the writer's own automatic checkpoint must still bound it. The threshold is
    scaled down to 1,000 pages at both levels (64,000 would make this write ~400 MB); the
    mechanism is SQLite's, and the threshold each level really sets is checked above."""
    threshold = 1000
    monkeypatch.setitem(AUTOCHECKPOINT_BYTES, sync, threshold * PAGE)
    db = Database(db_path, sync=sync)
    ensure_schema(db)
    db.enable_wal()
    with db.write_engine.connect() as conn:  # the scaled threshold is the one in force
        raw = conn.connection.driver_connection
        assert raw.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == threshold
    checkpointer = Checkpointer(db.write_engine, interval=0.001)
    writer = GroupCommitWriter(db.write_engine, on_commit=lambda _n, _s: checkpointer.poke())
    largest = 0
    try:
        for i in range(3 * threshold):  # >= 2 pages a commit: 6x the threshold
            writer.run(add(f"user{i}", hash_size=200))
            if i % 100 == 0:
                largest = max(largest, os.path.getsize(db.path + "-wal"))
        largest = max(largest, os.path.getsize(db.path + "-wal"))
        assert checkpointer.checkpoints >= 1
    finally:
        writer.close()
        checkpointer.close()
        db.dispose()
    assert largest <= 3 * threshold * (PAGE + 24)


def test_close_stops_the_thread_and_can_be_called_twice(db):
    db.enable_wal()
    checkpointer = Checkpointer(db.write_engine)
    checkpointer.poke()
    checkpointer.close()
    assert not checkpointer._thread.is_alive()
    checkpointer.close()
    checkpointer.poke()  # after close: harmless


def test_the_server_app_checkpoints_sqlite(tmp_path):
    from chatserver.app import ChatApp
    from chatserver.server import ServerConfig

    app = ChatApp(str(tmp_path / "chat.db"), ServerConfig(host="127.0.0.1", port=0))
    try:
        assert app.checkpointer is not None
    finally:
        app.stop()
    assert not app.checkpointer._thread.is_alive()


class FailingFirst:
    """The write engine, except that its first ``raw_connection()`` fails the way a full or
    broken disk does; it hands out real connections after that."""

    def __init__(self, engine):
        self.engine = engine
        self.calls = 0
        self.handed_out = []

    def raw_connection(self):
        self.calls += 1
        if self.calls == 1:
            raise sqlite3.OperationalError("disk I/O error")
        raw = self.engine.raw_connection()
        self.handed_out.append(raw)
        return raw


def test_a_failing_checkpoint_is_logged_and_the_next_poke_checkpoints_again(db, caplog):
    """A checkpoint that fails (disk full, I/O error) is logged, not raised out of the
    thread; the next commit's poke opens a fresh connection and checkpoints. Then a
    connection that breaks while held is dropped and replaced the same way."""
    db.enable_wal()
    with sqlite3.connect(db.path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    engine = FailingFirst(db.write_engine)
    writer = GroupCommitWriter(db.write_engine)
    checkpointer = Checkpointer(engine, interval=0.001)
    try:
        writer.run(add("ann"))
        checkpointer.poke()
        wait_until(lambda: any("WAL checkpoint failed: disk I/O error" in r.getMessage()
                               for r in caplog.records), what="the failure logged")
        assert checkpointer.checkpoints == 0 and names_in_main_file(db.path) == set()

        writer.run(add("bob"))
        checkpointer.poke()
        wait_until(lambda: names_in_main_file(db.path) == {"ann", "bob"},
                   what="the rows in the database file")
        assert engine.calls == 2 and checkpointer.checkpoints == 1

        engine.handed_out[0].driver_connection.close()  # broken under the checkpointer
        writer.run(add("cy"))
        checkpointer.poke()
        wait_until(lambda: sum("WAL checkpoint failed" in r.getMessage()
                               for r in caplog.records) == 2, what="the second failure")
        checkpointer.poke()
        wait_until(lambda: names_in_main_file(db.path) == {"ann", "bob", "cy"},
                   what="the last row in the database file")
        assert engine.calls == 3 and checkpointer.checkpoints == 2
    finally:
        checkpointer.close()
        writer.close()
