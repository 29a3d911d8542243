"""Fixtures for the PostgreSQL tests: a fresh, empty PostgreSQL database for every test.

The server is given by ``CHAT_TEST_POSTGRES_URL`` (a SQLAlchemy URL of a database the tests
may connect to as a role allowed to create databases, for example
``postgresql+psycopg://postgres@127.0.0.1:15432/chat_test``; ``.ci/run`` starts a throwaway
server and sets it). Without the variable every test here is skipped, saying why. With it,
anything wrong (psycopg missing, server unreachable) fails the tests: CI never skips them.

``pg_url`` is a fresh, empty database for each test: a new schema in one database created for
the session, with the URL setting ``search_path`` to that schema alone (``?options=
-csearch_path=...``), so the app, Alembic and the inspector see nothing else; it is dropped when
the test ends. That costs milliseconds, where CREATE DATABASE costs a few hundred; tests that
want a whole database as a deployment has it use ``new_postgres_database()``. Databases are
created through an AUTOCOMMIT connection to the variable's database and dropped WITH (FORCE),
so sessions a killed server left behind cannot keep them.

The databases use a linguistic collation (ICU ``en-US``) when the server has ICU, as
production databases usually do (``en_US.UTF-8``), so that nothing passes only because the
test server happens to sort by code point.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import NullPool

from chatserver.passwords import PasswordHasher
from chatserver.storage.database import Database
from chatserver.storage.migrate import ensure_schema
from tests.conftest import ServerProcess

# The service fixtures of tests/integration, here over this directory's PostgreSQL ``db``
# (pytest resolves their ``db`` where they are used); alice and bob for the contract suites.
from tests.integration.conftest import (  # noqa: F401
    FAST_HASH,
    alice,
    bob,
    clock,
    service,
    writer,
)

ENV_VAR = "CHAT_TEST_POSTGRES_URL"
SKIP_REASON = (f"{ENV_VAR} is not set: no PostgreSQL server to test against "
               "(.ci/run starts one; see docs/POSTGRES.md)")
_counter = itertools.count()


def _admin_url() -> URL:
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        pytest.skip(SKIP_REASON)
    url = make_url(raw)
    if url.get_backend_name() != "postgresql":
        pytest.fail(f"{ENV_VAR} must be a postgresql:// URL, not {raw!r}")
    if url.drivername == "postgresql":  # bare postgresql:// means psycopg2 to SQLAlchemy
        url = url.set(drivername="postgresql+psycopg")
    return url


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[tuple[Engine, URL, str]]:
    """An AUTOCOMMIT engine on the variable's database, its URL, and the CREATE DATABASE options."""
    url = _admin_url()
    try:
        engine = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with engine.connect() as conn:
            version = conn.execute(text("SHOW server_version_num")).scalar_one()
            icu = int(version) >= 150000 and conn.execute(text(
                "SELECT count(*) FROM pg_collation WHERE collname = 'en-US-x-icu'")).scalar_one()
    except Exception as exc:  # noqa: BLE001 - CI set the variable: fail, never skip
        pytest.fail(f"cannot use the PostgreSQL server of {ENV_VAR} "
                    f"({url.render_as_string(hide_password=True)}): {exc}", pytrace=False)
    options = "TEMPLATE template0 ENCODING 'UTF8'"
    if icu:
        options += " LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
    yield engine, url, options
    engine.dispose()


def _create_database(engine: Engine, options: str) -> str:
    name = f"chat_t{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:8]}"
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" {options}'))
    return name


def _drop_databases(engine: Engine, names: list[str]) -> None:
    with engine.connect() as conn:
        for name in names:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def new_postgres_database(postgres_admin) -> Iterator:
    """Create whole empty databases (``new_postgres_database() -> URL``); dropped at the end.

    As a deployment has it, but CREATE DATABASE copies a template and costs a few hundred
    milliseconds; most tests use ``pg_url`` (a schema) instead.
    """
    engine, url, options = postgres_admin
    created: list[str] = []

    def create() -> str:
        created.append(_create_database(engine, options))
        return url.set(database=created[-1]).render_as_string(hide_password=False)

    yield create
    _drop_databases(engine, created)


@pytest.fixture(scope="session")
def postgres_session_database(postgres_admin) -> Iterator[URL]:
    """One database for the whole session, in which each test gets schemas of its own."""
    engine, url, options = postgres_admin
    name = _create_database(engine, options)
    yield url.set(database=name)
    _drop_databases(engine, [name])


@pytest.fixture
def new_postgres_schema(postgres_session_database) -> Iterator:
    """Create empty schemas (``new_postgres_schema() -> URL``); dropped at the end.

    The URL sets the connections' ``search_path`` to the new schema alone, so everything
    that uses the default schema (the app, Alembic, the inspector) sees an empty database.
    """
    url = postgres_session_database
    created: list[str] = []
    engine = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)

    def create() -> str:
        name = f"t{next(_counter)}_{uuid.uuid4().hex[:8]}"
        with engine.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{name}"'))
        created.append(name)
        return url.update_query_dict({"options": f"-csearch_path={name}"}).render_as_string(
            hide_password=False)

    yield create
    with engine.connect() as conn:
        for name in created:
            # Whatever the test left connected (a killed server's sessions, an engine not
            # disposed) must not hold up the drop: this database is this session's alone.
            conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
    engine.dispose()


@pytest.fixture
def pg_url(new_postgres_schema) -> str:
    """The SQLAlchemy URL of a fresh, empty database (no tables), usable as ``Database(url)``."""
    return new_postgres_schema()


@pytest.fixture
def db(pg_url) -> Iterator[Database]:
    """A Database on a fresh PostgreSQL database, created at head by the start-up policy."""
    database = Database(pg_url)
    try:
        status = ensure_schema(database)
        assert status.state == "empty"
        yield database
    finally:
        database.dispose()


@pytest.fixture(scope="session")
def hasher() -> PasswordHasher:
    return PasswordHasher(FAST_HASH)


def raw(db: Database, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows as another process would see them, for SQL written for SQLite's sqlite3.

    ``?`` placeholders become psycopg's ``%s``; ``PRAGMA foreign_key_check`` becomes the
    equivalent query for orphans (PostgreSQL always enforces foreign keys, so it should
    always be empty). Other SQLite-only SQL fails loudly.
    """
    if sql.strip().upper().startswith("PRAGMA"):
        if sql.strip().upper() != "PRAGMA FOREIGN_KEY_CHECK":
            raise AssertionError(f"no PostgreSQL equivalent for {sql!r}")
        sql = FOREIGN_KEY_ORPHANS
    engine = create_engine(db.url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(sql.replace("?", "%s"), tuple(params)).fetchall()
            return [tuple(r) for r in rows]
    finally:
        engine.dispose()


FOREIGN_KEY_ORPHANS = """
    SELECT 'messages', m.id FROM messages m
        WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = m.recipient_id)
    UNION ALL
    SELECT 'send_receipts', r.sender_id FROM send_receipts r
        WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = r.sender_id)
"""


class PostgresServerProcess(ServerProcess):
    """``chat serve --db URL``: ServerProcess keeps its database as a Path, which would turn
    the URL's ``//`` into ``/``; here it is the URL string itself."""

    def __init__(self, url: str, extra_args: list[str] | None = None):
        super().__init__(Path("unused"), extra_args)
        self.db_path = url  # start() passes str(self.db_path) to --db


@pytest.fixture
def pg_server_factory() -> Iterator:
    """Start ``chat serve`` processes on PostgreSQL URLs; all killed at the end."""
    started: list[PostgresServerProcess] = []

    def start(url: str, extra_args: list[str] | None = None) -> PostgresServerProcess:
        server = PostgresServerProcess(url, extra_args).start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)
