"""Schema revisions: where a database stands, and bringing it to head safely.

Start-up policy (docs/MIGRATIONS.md): a new or empty database is created at head; a SQLite
file behind head is backed up next to itself and upgraded in one transaction (or refused
with ``allow_upgrade=False``); a PostgreSQL database behind head is refused with the command
to run, since one process must migrate rather than every server instance; a database ahead
of this code, or one that is not a chat database, is refused and left untouched.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from importlib.resources import files

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.exc import DatabaseError

from chatserver.storage.database import Database

log = logging.getLogger(__name__)


class SchemaError(Exception):
    """The database cannot be used by this version as it is (the message says why and what to do)."""


def alembic_config() -> Config:
    """An Alembic config whose scripts are the ones installed with this package."""
    config = Config()
    config.set_main_option("script_location", str(files("chatserver_migrations")))
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


@dataclass(frozen=True)
class SchemaStatus:
    """``state`` is one of: empty, current, behind, ahead, foreign."""

    state: str
    current: str | None
    head: str


def schema_status(db: Database) -> SchemaStatus:
    """Where this database stands relative to the code's head revision. Touches nothing."""
    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    try:
        with db.read_engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            current = MigrationContext.configure(conn).get_current_revision()
    except DatabaseError as exc:
        raise SchemaError(f"{_where(db)} is not a chat database ({exc.orig})") from None
    if current is None:
        if tables - {"alembic_version"}:
            return SchemaStatus("foreign", None, head)
        return SchemaStatus("empty", None, head)
    if current == head:
        return SchemaStatus("current", current, head)
    try:
        known = {rev.revision for rev in script.walk_revisions()}
    except Exception:  # pragma: no cover - a broken script directory is a packaging bug
        known = set()
    return SchemaStatus("behind" if current in known else "ahead", current, head)


def ensure_schema(db: Database, *, allow_upgrade: bool = True) -> SchemaStatus:
    """Apply the start-up policy; return the status found before any change."""
    status = schema_status(db)
    if status.state == "current":
        return status
    if status.state == "foreign":
        raise SchemaError(f"{_where(db)} is not a chat database (it has other tables); not touching it")
    if status.state == "ahead":
        raise SchemaError(
            f"{_where(db)} is at revision {status.current}, which this version does not know "
            f"(it was written by a newer version of chat; this one ends at {status.head}); "
            "not touching it"
        )
    if status.state == "behind":
        if not allow_upgrade:
            raise SchemaError(
                f"{_where(db)} is at revision {status.current}, behind {status.head}; "
                f"run: chat admin migrate --db {_cli_db(db)}"
            )
        if not db.is_sqlite:
            raise SchemaError(
                f"{_where(db)} is at revision {status.current}, behind {status.head}; one process "
                f"must upgrade it before servers start: chat admin migrate --db {_cli_db(db)}"
            )
        backup = backup_sqlite(db, suffix=f"before-{status.head}")
        log.info("backed up %s to %s before upgrading", db.path, backup)
    upgrade(db)
    log.info("database %s upgraded from %s to %s", _where(db), status.current or "empty", status.head)
    return status


def upgrade(db: Database, revision: str = "head") -> None:
    """Upgrade in one transaction on a connection with foreign keys off.

    Foreign keys are off because batch mode on SQLite recreates tables, and dropping the old
    ``accounts`` with them on would cascade into ``messages``; ``foreign_key_check`` runs
    before the commit instead.
    """
    db.enable_wal()
    config = alembic_config()
    with db.write_engine.connect() as conn:
        if db.is_sqlite:  # outside any transaction, where SQLite ignores this pragma
            conn.connection.dbapi_connection.execute("PRAGMA foreign_keys = OFF")
        try:
            with conn.begin():
                config.attributes["connection"] = conn
                command.upgrade(config, revision)
                if db.is_sqlite:
                    problems = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if problems:
                        raise SchemaError(f"upgrade would break foreign keys: {problems[:5]}")
        finally:
            if db.is_sqlite:  # the connection goes back to the pool: restore its setting
                conn.connection.dbapi_connection.execute("PRAGMA foreign_keys = ON")


def backup_sqlite(db: Database, dest: str | None = None, *, suffix: str = "backup") -> str:
    """A consistent copy of a live SQLite database through the online backup API."""
    if dest is None:
        dest = f"{db.path}.{suffix}-{time.strftime('%Y%m%dT%H%M%S')}"
    source = sqlite3.connect(db.path, timeout=30)
    try:
        target = sqlite3.connect(dest)
        try:
            source.backup(target)
        finally:
            target.close()
    finally:
        source.close()
    return dest


def _where(db: Database) -> str:
    return db.display_name


def _cli_db(db: Database) -> str:
    return db.path if db.is_sqlite else "URL"
