"""Engines, connection settings and units of work for SQLite (default) and PostgreSQL."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError

from chatserver.errors import StorageUnavailable
from chatserver.storage.repository import Repository, sqlite_storage_error

T = TypeVar("T")

SYNC_LEVELS = ("full", "normal")
BUSY_TIMEOUT_MS = 30_000  # how long a SQLite writer waits for another process's lock
# WAL size at which a commit runs SQLite's automatic checkpoint, which syncs the WAL and then
# the database file. At --sync normal those are the only syncs a commit ever pays: at
# SQLite's default of 1,000 pages (of 4 KiB), ~2 ms every ~250 lone sends, a third of all
# the time spent in COMMIT. 16,000 pages of 4 KiB (~64 MiB of WAL before the checkpoint)
# makes them 16x rarer (4,000 first: 4x). At full every commit syncs the WAL anyway and the
# checkpoint adds one sync in ~250, so the default stays (BENCHMARKS.md, "What changed").
# In bytes, so that a database of smaller pages checkpoints as often per message: a count
# of frames would make a batch of acks, which changes four times as many 1 KiB pages as
# 4 KiB ones, checkpoint four times as often.
AUTOCHECKPOINT_BYTES = {"full": 1000 * 4096, "normal": 16_000 * 4096}
# Page size of a SQLite database this package creates (SQLite's default is 4,096). A WAL
# frame is one page, and a lone send changes four pages (the message, its recipient index
# entry, the id counter, the receipt) whatever their size: at 1 KiB each commit writes a
# quarter of the bytes, the checkpoints copy a quarter, and at --sync normal that was
# +10% on sends from one client (BENCHMARKS.md, "What changed"). Fixed when the file is
# created: an existing database keeps its own (DESIGN.md says how to convert one).
NEW_DATABASE_PAGE_SIZE = 1024
# Bound parameters are message bodies and password hashes: never put them in an exception
# text, which could end up in a log.
_ENGINE_OPTIONS = {"hide_parameters": True}


def autocheckpoint_pages(sync: str, page_size: int) -> int:
    """SQLite's ``wal_autocheckpoint`` (a count of pages) for ``AUTOCHECKPOINT_BYTES``."""
    return max(1, AUTOCHECKPOINT_BYTES[sync] // page_size)


def database_url(path_or_url: str) -> str:
    """A SQLAlchemy URL for ``path_or_url``: URLs pass through, anything else is a SQLite file.

    A bare ``postgresql://`` means psycopg 3 (SQLAlchemy would otherwise pick psycopg2).
    """
    if path_or_url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + path_or_url.split("://", 1)[1]
    if "://" in path_or_url:
        return path_or_url
    return "sqlite+pysqlite:///" + os.path.abspath(path_or_url)


def shown_database(path_or_url: str) -> str:
    """``path_or_url`` fit for messages and logs: a URL's password becomes ``***``."""
    if "://" not in path_or_url:
        return path_or_url
    try:
        return make_url(path_or_url).render_as_string(hide_password=True)
    except Exception:  # not even a URL: show nothing of it rather than a secret
        return "<the --db URL>"


def _configure_sqlite(engine: Engine, sync: str, begin_sql: str) -> None:
    """Pragmas on every new connection, and our own BEGIN.

    pysqlite's implicit transactions are switched off so that SQLAlchemy's ``begin`` emits the
    statement we choose: BEGIN IMMEDIATE for writers, so that a writer takes the lock up front
    and waits in busy_timeout instead of failing with "database is locked" when it upgrades a
    read lock (a deferred read-then-write transaction ignores the busy timeout).
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.execute(f"PRAGMA synchronous = {sync.upper()}")
        page_size = cur.execute("PRAGMA page_size").fetchone()[0]
        cur.execute(f"PRAGMA wal_autocheckpoint = {autocheckpoint_pages(sync, page_size)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        if conn.info.pop(_BEGUN, False):  # try_begin_now took the lock already
            return
        # Straight to the driver: exec_driver_sql's machinery cost more than the BEGIN
        # itself, once per write batch. Errors are wrapped as SQLAlchemy would wrap them.
        try:
            conn.connection.driver_connection.execute(begin_sql)
        except sqlite3.Error as exc:
            raise DBAPIError.instance(begin_sql, (), exc, sqlite3.Error) from exc


_BEGUN = "chat_begun"  # Connection.info flag: the next begin() is already under way


def begin_now(conn, cursor=None) -> None:
    """SQLite: take the write lock now (BEGIN IMMEDIATE on the driver), so that the next
    ``conn.begin()`` runs in it, or commit it with ``commit_begun`` without SQLAlchemy's
    transaction object. Waits for another connection's lock as long as the connection's
    busy timeout; if that runs out (or the database fails), StorageUnavailable, as
    ``storage_errors`` makes SQLAlchemy's own BEGIN fail.

    ``cursor``: a DBAPI cursor of ``conn`` to run it on, for a caller that keeps one (the
    writer: finding the driver connection through SQLAlchemy each time costs more than
    the statement's own Python). The same goes for the functions below."""
    try:
        _driver(conn, cursor).execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise sqlite_storage_error(exc) from exc
    conn.info[_BEGUN] = True


def try_begin_now(conn, cursor=None) -> bool:
    """``begin_now``, or False, and nothing begun, if another connection holds the lock
    (or the database fails). For a caller that must not wait (the I/O loop committing a
    send inline: it would stall every connection), the connection's busy timeout is set
    to 0 with ``wait_for_locks(conn, False)``."""
    try:
        begin_now(conn, cursor)
    except StorageUnavailable:  # SQLITE_BUSY / locked
        return False
    return True


def commit_begun(conn, cursor=None) -> None:
    """SQLite: commit the transaction ``begin_now`` opened. Straight to the driver when
    nothing went through SQLAlchemy since (it never learned of the transaction, and its
    Transaction object would cost more than the COMMIT's own work); through SQLAlchemy if
    something did (it then took the transaction over). A failure raises (StorageUnavailable
    for an operational error, as ``storage_errors`` and ``sqlite_storage_error`` make it;
    else the database's own exception) and leaves the transaction open: the caller
    discards the connection."""
    _end_begun(conn, "COMMIT", cursor)


def rollback_begun(conn, cursor=None) -> None:
    """SQLite: roll back the transaction ``begin_now`` opened, as ``commit_begun`` would
    commit it (errors likewise: the caller then discards the connection)."""
    _end_begun(conn, "ROLLBACK", cursor)


def _driver(conn, cursor):
    """What runs a statement straight on ``conn``'s driver: ``cursor`` if given."""
    return conn.connection.driver_connection if cursor is None else cursor


def _end_begun(conn, statement: str, cursor) -> None:
    if conn.in_transaction():
        with storage_errors():
            if statement == "COMMIT":
                conn.commit()
            else:
                conn.rollback()
        return
    conn.info.pop(_BEGUN, None)
    try:
        _driver(conn, cursor).execute(statement)
    except sqlite3.Error as exc:
        raise sqlite_storage_error(exc) from exc


def wait_for_locks(conn, wait: bool) -> None:
    """SQLite: whether statements on ``conn`` wait up to BUSY_TIMEOUT_MS for another
    connection's lock (every connection's default) or fail at once. Put it back before the
    connection goes back to the pool: whoever took it next would fail where it should wait."""
    conn.connection.driver_connection.execute(
        f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS if wait else 0}")


def journal_in_memory(conn, in_memory: bool) -> None:
    """SQLite: whether the transactions ``conn`` begins from now on keep their sub-journals
    (and other temporary files) in memory or in files (every connection's default).

    A savepoint, and a statement that may fail halfway (a multi-row INSERT), keep the
    original of every existing page they change in a sub-journal, to undo it; past 64 KiB
    SQLite spills it to a file it creates, writes and unlinks in the temp directory. In
    memory it costs the pages one transaction changes: fine for a bounded batch of sends,
    not for deleting an account's queue of 64 KiB messages. Takes effect at the next BEGIN;
    put the default back before the connection goes back to the pool."""
    conn.connection.driver_connection.execute(
        f"PRAGMA temp_store = {'MEMORY' if in_memory else 'DEFAULT'}")


PRIVATE_FILE_MODE = 0o600  # messages and password hashes are nobody else's business


def create_private_file(path: str) -> bool:
    """Create ``path`` empty with owner-only permissions if it does not exist; True if created.

    Created with the mode rather than chmod-ed afterwards, so there is no moment at which
    others could open it; SQLite gives its -wal and -shm files the same permissions.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        return False
    os.close(fd)
    os.chmod(path, PRIVATE_FILE_MODE)  # the umask may have removed the owner's bits
    return True


class UnsuitableDatabase(Exception):
    """The database cannot work the way the server needs it to (see the message)."""


class Database:
    """One chat database: a write engine, a read engine and how to open units of work.

    For SQLite the write engine begins with BEGIN IMMEDIATE and the read engine with a plain
    (deferred) BEGIN, which in WAL mode reads a consistent snapshot without blocking writers.
    """

    def __init__(self, path_or_url: str, *, sync: str = "full", pool_size: int = 8):
        if sync not in SYNC_LEVELS:
            raise ValueError(f"sync must be one of {SYNC_LEVELS}")
        self.url = database_url(path_or_url)
        self.sync = sync
        self.is_sqlite = make_url(self.url).get_backend_name() == "sqlite"
        # For messages and logs: never print a password that is part of the URL.
        self.display_name = (make_url(self.url).database if self.is_sqlite
                             else make_url(self.url).render_as_string(hide_password=True))
        if self.is_sqlite:
            self.path = make_url(self.url).database
            self.write_engine = create_engine(self.url, pool_size=pool_size, max_overflow=32,
                                              **_ENGINE_OPTIONS)
            _configure_sqlite(self.write_engine, sync, "BEGIN IMMEDIATE")
            self.read_engine = create_engine(self.url, pool_size=pool_size, max_overflow=64,
                                             **_ENGINE_OPTIONS)
            _configure_sqlite(self.read_engine, sync, "BEGIN")
        else:
            self.path = None
            self.write_engine = create_engine(self.url, pool_size=pool_size, max_overflow=64,
                                              **_ENGINE_OPTIONS,
                                              pool_pre_ping=True)
            # Same pool; reads run in REPEATABLE READ so that read() sees one snapshot, as a
            # SQLite read transaction does (READ COMMITTED would see each statement's own).
            self.read_engine = self.write_engine.execution_options(
                isolation_level="REPEATABLE READ")

    def enable_wal(self) -> None:
        """Switch a SQLite file to WAL (persistent in the file; readers never block the writer).

        SQLite answers with the mode it is in, and keeps the old one where WAL cannot work
        (no shared memory: some network file systems, a VFS without locks). The server's
        design depends on WAL (readers beside the writer, commits on the loop thread that
        never wait), so anything else is refused rather than run slower and differently.

        A database with no pages yet (a new file) first gets ``NEW_DATABASE_PAGE_SIZE``:
        the switch to WAL writes its first page, after which the size is fixed. The pools'
        connections are then closed: they set their checkpoint threshold for the old size."""
        if self.is_sqlite:
            raw = self.write_engine.raw_connection()
            try:
                cursor = raw.cursor()
                new_file = cursor.execute("PRAGMA page_count").fetchone()[0] == 0
                if new_file:
                    cursor.execute(f"PRAGMA page_size = {NEW_DATABASE_PAGE_SIZE}")
                mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            finally:
                raw.close()
            if new_file:
                self.dispose()
            if str(mode).lower() != "wal":
                raise UnsuitableDatabase(
                    f"SQLite cannot use WAL mode for {self.display_name} (it stays in "
                    f"{mode!r} mode): WAL needs shared memory and file locks, which this file "
                    f"system or VFS does not give; put the database on a local disk")

    def page_size(self) -> int:
        """SQLite: the file's page size in bytes."""
        with self.read_engine.connect() as conn:
            return conn.connection.driver_connection.execute("PRAGMA page_size").fetchone()[0]

    @contextmanager
    def unit_of_work(self) -> Iterator[UnitOfWork]:
        """A write transaction that rolls back unless ``commit()`` is called."""
        with storage_errors():
            with self.write_engine.connect() as conn:
                uow = UnitOfWork(conn)
                try:
                    yield uow
                finally:
                    uow.close()

    def read(self, fn: Callable[[Repository], T]) -> T:
        """Run ``fn`` in a read-only snapshot and return its result."""
        with storage_errors():
            with self.read_engine.connect() as conn, conn.begin():
                return fn(Repository(conn))

    def dispose(self) -> None:
        self.write_engine.dispose()
        if self.read_engine is not self.write_engine:
            self.read_engine.dispose()


class UnitOfWork:
    """Wraps one transaction; ``repo`` is the repository bound to it."""

    def __init__(self, conn):
        self.conn = conn
        self._tx = conn.begin()
        self.repo = Repository(conn)
        self._done = False

    def commit(self) -> None:
        self._tx.commit()
        self._done = True

    def close(self) -> None:
        if not self._done:
            self._tx.rollback()
            self._done = True


@contextmanager
def storage_errors() -> Iterator[None]:
    """Turn database-level failures (disk full, read-only, I/O) into StorageUnavailable."""
    try:
        yield
    except OperationalError as exc:
        raise StorageUnavailable(f"the database is unavailable: {exc.orig}") from exc
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise StorageUnavailable("lost the connection to the database") from exc
        raise
