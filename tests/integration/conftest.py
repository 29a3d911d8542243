"""Fixtures for the storage and service tests: a real SQLite file created by the migrations.

Every database here lives in ``tmp_path`` and is brought to head by
``chatserver.storage.migrate.ensure_schema`` (the server's own start-up path), never by
``metadata.create_all``, so the tests exercise the schema the migrations really build.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import event

from chatserver.passwords import HashParameters, PasswordHasher
from chatserver.service import ChatService
from chatserver.storage.database import Database
from chatserver.storage.migrate import ensure_schema
from chatserver.storage.repository import Repository
from chatserver.storage.writer import GroupCommitWriter

# Cheap Argon2 parameters for tests only (the default costs 64 MiB and t=3 per hash).
FAST_HASH = HashParameters(time_cost=1, memory_kib=64, parallelism=1)
START_MS = 1_700_000_000_000
PASSWORD = "correct horse"  # >= 8 characters  # the fake clock's first reading (ms since the Unix epoch)


class FakeClock:
    """A clock the test moves by hand; ``now()`` is what ChatService calls."""

    def __init__(self, start: int = START_MS):
        self.ms = start

    def now(self) -> int:
        return self.ms

    def advance(self, ms: int) -> int:
        self.ms += ms
        return self.ms


@pytest.fixture(scope="session")
def hasher() -> PasswordHasher:
    return PasswordHasher(FAST_HASH)


@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "chat.db")


@pytest.fixture
def db(db_path) -> Iterator[Database]:
    """A Database on a new file, created at head by the start-up policy."""
    database = Database(db_path)
    try:
        status = ensure_schema(database)
        assert status.state == "empty"
        yield database
    finally:
        database.dispose()


@pytest.fixture
def writer(db) -> Iterator[GroupCommitWriter]:
    w = GroupCommitWriter(db.write_engine)
    yield w
    w.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def service(db, writer, hasher, clock) -> ChatService:
    return ChatService(db, writer, hasher, clock=clock.now)


@pytest.fixture
def alice(service):
    return service.register("Alice", PASSWORD)


@pytest.fixture
def bob(service):
    return service.register("Bob", PASSWORD)


@pytest.fixture
def sqlalchemy_commits(db):
    """One entry per commit that went through SQLAlchemy's transaction object."""
    seen = []

    def on_commit(_conn):
        seen.append(1)

    event.listen(db.write_engine, "commit", on_commit)
    yield seen
    event.remove(db.write_engine, "commit", on_commit)


class Held:
    """Holds the writer inside one batch so that the jobs queued meanwhile form the next."""

    WAIT = 30

    def __init__(self, writer):
        self.entered, self.release = threading.Event(), threading.Event()
        self.future = writer.submit(self._job)
        assert self.entered.wait(self.WAIT)

    def _job(self, _repo):
        self.entered.set()
        assert self.release.wait(self.WAIT)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.future.result(self.WAIT)


def committed_rows(db, sql: str) -> list:
    """What another connection sees of ``sql``'s first column: committed rows only."""
    conn = sqlite3.connect(db.path)
    try:
        return [r[0] for r in conn.execute(sql)]
    finally:
        conn.close()


def committed_names(db) -> list[str]:
    """Committed account names, in id order."""
    return committed_rows(db, "SELECT name FROM accounts ORDER BY id")


def committed_bodies(db) -> list[str]:
    """Committed message bodies, in id order."""
    return committed_rows(db, "SELECT body FROM messages ORDER BY id")


def add(name: str):
    """A writer job that adds the account ``name`` and returns its id."""
    def job(repo):
        return repo.add_account(name, name.casefold(), "h", 1).id
    return job


def break_commits(monkeypatch):
    """Make the COMMIT of every transaction that stores messages fail, as a full disk or an
    I/O error would fail it (here: a deferred foreign key the transaction violates, checked
    only at COMMIT). Returns a function that mends it."""
    store = Repository.store_messages

    def store_then_break_the_commit(repo, batch, cap=0):
        outcomes = store(repo, batch, cap)
        cur = repo.conn.connection.driver_connection.cursor()
        cur.execute("CREATE TEMP TABLE IF NOT EXISTS parent (id INTEGER PRIMARY KEY)")
        cur.execute("CREATE TEMP TABLE IF NOT EXISTS child (parent_id INTEGER REFERENCES"
                    " parent (id) DEFERRABLE INITIALLY DEFERRED)")
        cur.execute("INSERT INTO child VALUES (42)")
        return outcomes

    monkeypatch.setattr(Repository, "store_messages", store_then_break_the_commit)
    return lambda: monkeypatch.setattr(Repository, "store_messages", store)


def trace_statements(writer) -> list[str]:
    """Every statement the writer's connection runs from now on, in order (SQLite's trace
    callback, installed by a job on that connection; lost if the connection is replaced)."""
    statements: list[str] = []
    writer.run(lambda repo: repo.conn.connection.driver_connection.set_trace_callback(
        statements.append))
    statements.clear()  # the installing job's own
    return statements
