"""Administration of a chat database: what ``chat admin`` does, without any user interface.

Every function takes an open :class:`Database` and is safe while ``chat serve`` runs on the
same database: reads are snapshots, writes are short ``BEGIN IMMEDIATE`` transactions that
wait in the busy timeout instead of failing with "database is locked", and long work
(purge, backup) is split into steps so the server's writers are never held up for long.

Refusals raise :class:`AdminError` (or a domain error such as ``NoSuchAccount``); the
message is one line meant for the operator. Progress is reported through optional
``progress(done, total)`` callbacks; this module never prints.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import text

from chatserver import domain
from chatserver.domain import Account
from chatserver.errors import InvalidName, NoSuchAccount
from chatserver.passwords import PasswordHasher
from chatserver.storage import database
from chatserver.storage.database import Database, shown_database
from chatserver.storage.migrate import SchemaStatus, head_revision, schema_status, upgrade

DAY_MS = 86_400_000
PURGE_BATCH_SIZE = 1000  # rows per write transaction: the server's writers wait at most one batch
BACKUP_STEP_PAGES = 1024  # pages copied per backup step (1 MiB of 1 KiB pages, 4 MiB of 4 KiB)
# A SQLite database's files: the database and the journals that may sit beside it.
SQLITE_FILE_SUFFIXES = ("", "-wal", "-shm", "-journal")

Progress = Callable[[int, int], None]


class AdminError(Exception):
    """The operation cannot be done as asked; the message (one line) says why."""


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


# -- the database file ------------------------------------------------------------------------


def world_readable(path: str) -> int | None:
    """The file's permission bits if every user of the machine may read it, else None."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    return mode if mode & 0o004 else None


def create_private_file(path: str) -> None:
    """Create an empty owner-only file (see storage.database); AdminError if it exists."""
    try:
        created = database.create_private_file(path)
    except OSError as exc:
        raise AdminError(f"cannot create {path}: {exc.strerror}") from None
    if not created:
        raise AdminError(f"{path} already exists")


def require_head(db: Database, cli_db: str | None = None) -> SchemaStatus:
    """The schema status if this is a chat database at head; AdminError otherwise."""
    status = schema_status(db)
    if status.state in ("empty", "foreign"):
        raise AdminError(f"{db.display_name} is not a chat database")
    if status.state == "ahead":
        raise AdminError(
            f"{db.display_name} was written by a newer version of chat "
            f"(revision {status.current}); upgrade chat to use it")
    if status.state == "behind":
        raise AdminError(
            f"{db.display_name} is at revision {status.current}, behind {status.head}; "
            f"run: chat admin migrate --db {shown_database(cli_db or db.display_name)}")
    return status


# -- accounts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccountDetails:
    account: Account
    undelivered: int
    oldest_undelivered_at: int | None  # ms since the epoch


def _key(name: str) -> str:
    try:
        return domain.name_key(name)
    except InvalidName:
        raise NoSuchAccount(f"there is no account named {name!r}") from None


def show_account(db: Database, name: str) -> AccountDetails:
    """One account with its undelivered count and the age of its oldest waiting message."""
    key = _key(name)

    def read(repo) -> AccountDetails:
        found = repo.get_by_key(key)
        if found is None:
            raise NoSuchAccount(f"there is no account named {name!r}")
        account = found[0]
        return AccountDetails(account, repo.count_undelivered(account.id),
                              repo.oldest_undelivered_at(account.id))

    return db.read(read)


def delete_account(db: Database, name: str) -> tuple[Account, int]:
    """Delete the account as the protocol's delete does; return it and the discarded count.

    A running server notices the account is gone and ends its sessions (its account watcher).
    """
    key = _key(name)
    with db.unit_of_work() as uow:
        found = uow.repo.get_by_key(key)
        if found is None:
            raise NoSuchAccount(f"there is no account named {name!r}")
        discarded = uow.repo.delete_account(found[0].id)
        uow.commit()
    return found[0], discarded


def reset_password(db: Database, name: str, password: str, hasher: PasswordHasher) -> Account:
    """Give the account a new password (hashed here, before the write transaction). A
    server running on the database ends the account's sessions within seconds."""
    domain.validate_password(password)
    key = _key(name)
    if db.read(lambda repo: repo.account_id_by_key(key)) is None:
        raise NoSuchAccount(f"there is no account named {name!r}")
    password_hash = hasher.hash(password)
    with db.unit_of_work() as uow:
        found = uow.repo.get_by_key(key)
        if found is None:  # deleted while we were hashing
            raise NoSuchAccount(f"there is no account named {name!r}")
        uow.repo.reset_password_hash(found[0].id, password_hash)
        uow.commit()
    return found[0]


# -- statistics -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    accounts: int
    undelivered: int
    oldest_undelivered_at: int | None  # ms since the epoch, None when nothing waits
    database_bytes: int | None  # None when the backend cannot tell
    revision: str | None
    head: str


def database_size(db: Database) -> int | None:
    """Bytes the database takes: the SQLite file and its WAL, or PostgreSQL's own figure."""
    if db.is_sqlite:
        total = 0
        for path in (db.path, db.path + "-wal"):
            try:
                total += os.path.getsize(path)
            except FileNotFoundError:
                pass
        return total
    if db.write_engine.dialect.name == "postgresql":
        with db.read_engine.connect() as conn:
            return conn.execute(text("SELECT pg_database_size(current_database())")).scalar()
    return None


def stats(db: Database) -> Stats:
    status = schema_status(db)

    def read(repo) -> tuple[int, int, int | None]:
        return (repo.count_accounts(), *repo.undelivered_totals())

    accounts, undelivered, oldest = db.read(read)
    return Stats(accounts, undelivered, oldest, database_size(db), status.current, status.head)


# -- retention --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PurgeCounts:
    """What a purge removes (or, for a plan, would remove)."""

    messages: int = 0
    recipients: int = 0  # accounts the purged messages were waiting for (plans only)
    receipts: int = 0


def cutoff(days: int, now_ms: int) -> int:
    """The instant (ms) ``days`` days before ``now_ms``: older things may be purged."""
    return now_ms - days * DAY_MS


def plan_purge(db: Database, *, messages_before: int | None = None,
               receipts_before: int | None = None) -> PurgeCounts:
    """Count what ``purge`` with the same cutoffs would remove; changes nothing."""

    def read(repo) -> PurgeCounts:
        messages, recipients = (repo.count_messages_sent_before(messages_before)
                                if messages_before is not None else (0, 0))
        receipts = (repo.count_receipts_created_before(receipts_before)
                    if receipts_before is not None else 0)
        return PurgeCounts(messages, recipients, receipts)

    return db.read(read)


def purge(db: Database, *, messages_before: int | None = None,
          receipts_before: int | None = None, batch_size: int = PURGE_BATCH_SIZE,
          progress: Progress | None = None) -> PurgeCounts:
    """Delete undelivered messages sent before ``messages_before`` and send receipts created
    before ``receipts_before`` (ms; None leaves that kind alone), ``batch_size`` rows per
    transaction. ``progress(done, total)`` follows the rows deleted against the plan.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    plan = plan_purge(db, messages_before=messages_before, receipts_before=receipts_before)
    total = plan.messages + plan.receipts
    done = 0
    if progress:
        progress(0, total)

    messages = 0
    if messages_before is not None and plan.messages:
        after_id = 0
        while True:
            with db.unit_of_work() as uow:
                ids = uow.repo.message_ids_sent_before(messages_before, after_id, batch_size)
                if not ids:
                    break
                deleted = uow.repo.delete_messages_sent_before(messages_before, ids)
                uow.commit()
            messages += deleted
            after_id = ids[-1]
            done = min(done + deleted, total)
            if progress:
                progress(done, total)

    receipts = 0
    if receipts_before is not None and plan.receipts:
        after = None
        while True:  # one pass over the receipts' key, batch_size rows per transaction
            with db.unit_of_work() as uow:
                deleted, after = uow.repo.delete_receipts_created_before(
                    receipts_before, after, batch_size)
                uow.commit()
            receipts += deleted
            done = min(done + deleted, total)
            if progress:
                progress(done, total)
            if after is None:
                break

    if progress:
        progress(total, total)
    return PurgeCounts(messages=messages, recipients=plan.recipients, receipts=receipts)


# -- backup -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupResult:
    path: str
    pages: int
    bytes: int


def backup(db: Database, dest: str, *, step_pages: int = BACKUP_STEP_PAGES,
           progress: Progress | None = None) -> BackupResult:
    """A consistent copy of a live SQLite database at ``dest``, through the online backup API.

    The source connection holds one read transaction for the whole copy, so every step copies
    from the same snapshot: the copy is the database as of the start, and the server's writes
    meanwhile (WAL mode) neither block nor restart it. The copy is written next to ``dest``
    with owner-only permissions, checked with ``PRAGMA quick_check``, then renamed into place.
    ``progress(done, total)`` counts pages.
    """
    if not db.is_sqlite:
        raise AdminError("backup copies SQLite files; for PostgreSQL use pg_dump")
    dest = os.path.abspath(dest)
    if os.path.exists(dest):
        raise AdminError(f"{dest} already exists; choose a new name")
    directory = os.path.dirname(dest)
    if not os.path.isdir(directory):
        raise AdminError(f"no directory {directory}")
    partial = f"{dest}.partial-{os.getpid()}"
    create_private_file(partial)
    try:
        pages = _copy(db.path, partial, step_pages, progress)
        check = sqlite3.connect(partial)
        try:
            result = check.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            check.close()
        if result != "ok":
            raise AdminError(f"the copy failed its integrity check ({result}); {dest} not written")
        os.replace(partial, dest)
    except BaseException:
        _remove_with_journals(partial)
        raise
    return BackupResult(dest, pages, os.path.getsize(dest))


def _remove_with_journals(path: str) -> None:
    """Delete a half-made SQLite file and whatever journal files it has."""
    for suffix in SQLITE_FILE_SUFFIXES:
        try:
            os.remove(path + suffix)
        except FileNotFoundError:
            pass


def _copy(source_path: str, dest_path: str, step_pages: int, progress: Progress | None) -> int:
    try:
        source = sqlite3.connect(source_path, timeout=30, isolation_level=None)
    except sqlite3.Error as exc:
        raise AdminError(f"cannot open {source_path}: {exc}") from None
    try:
        # Start a read transaction and pin its snapshot; sqlite3_backup_step uses an open
        # transaction of the source connection instead of taking a new snapshot per step.
        source.execute("BEGIN")
        total = source.execute("PRAGMA page_count").fetchone()[0]
        if progress:
            progress(0, total)
        target = sqlite3.connect(dest_path)
        try:
            source.backup(target, pages=step_pages, progress=(
                (lambda _status, remaining, count: progress(count - remaining, count))
                if progress else None))
        finally:
            target.close()
        source.execute("COMMIT")
    except sqlite3.Error as exc:
        raise AdminError(f"backup failed: {exc}") from None
    finally:
        source.close()
    return total


# -- restore ----------------------------------------------------------------------------------

RESTORE_ID_GAP = 1_000_000_000  # how far ids jump when the replaced database cannot be read
_COUNTERS = ("accounts", "messages")  # the AUTOINCREMENT tables whose ids clients remember


@dataclass(frozen=True)
class RestoreResult:
    path: str
    set_aside: str | None  # the replaced database's files, renamed with this prefix
    next_ids: dict[str, int]  # table -> the id the restored database hands out next
    gap: bool  # the replaced database could not be read: ids jumped by RESTORE_ID_GAP


def restore(backup_path: str, db_path: str, *, step_pages: int = BACKUP_STEP_PAGES,
            progress: Progress | None = None) -> RestoreResult:
    """Replace the SQLite database at ``db_path`` with a copy of ``backup_path``.

    Unlike the rest of this module it needs the server stopped, and refuses otherwise:
    taking the current database out of WAL mode needs every other connection closed (that
    also folds its ``-wal`` file into it). The current files are renamed aside
    (``<db>.before-restore-<time>``, with their ``-wal``/``-shm``), never deleted. Message
    and account ids are never reused, and clients drop an id they have seen as a duplicate,
    so the restored database's id counters are raised to the replaced one's; if that one
    cannot be read, they jump by ``RESTORE_ID_GAP``. The copy is checked, owner-only, in WAL
    mode, and put in place with one rename; on any failure the old files go back.
    """
    backup_path, db_path = os.path.abspath(backup_path), os.path.abspath(db_path)
    if not os.path.isfile(backup_path):
        raise AdminError(f"no backup at {backup_path}")
    if os.path.exists(db_path) and os.path.samefile(backup_path, db_path):
        raise AdminError("the backup and the database are the same file")
    _check_backup(backup_path)
    counters = _stop_using(db_path) if os.path.exists(db_path) else {}
    gap = counters is None
    directory = os.path.dirname(db_path)
    partial = os.path.join(directory, f".{os.path.basename(db_path)}.restoring-{os.getpid()}")
    create_private_file(partial)
    set_aside = None
    try:
        _copy(backup_path, partial, step_pages, progress)
        next_ids = _raise_counters(partial, counters)
        if os.path.exists(db_path):
            set_aside = f"{db_path}.before-restore-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
            for suffix in SQLITE_FILE_SUFFIXES:
                if os.path.exists(db_path + suffix):
                    os.rename(db_path + suffix, set_aside + suffix)
        os.replace(partial, db_path)
    except BaseException:
        if set_aside is not None:
            for suffix in SQLITE_FILE_SUFFIXES:
                if os.path.exists(set_aside + suffix) and not os.path.exists(db_path + suffix):
                    os.rename(set_aside + suffix, db_path + suffix)
        _remove_with_journals(partial)
        raise
    return RestoreResult(db_path, set_aside, next_ids, gap)


def _check_backup(path: str) -> None:
    """A readable chat database that passes SQLite's quick check, or AdminError."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"accounts", "messages", "alembic_version"} <= tables:
                raise AdminError(f"{path} is not a chat database")
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise AdminError(f"cannot read the backup {path}: {exc}") from None
    if result != "ok":
        raise AdminError(f"the backup {path} failed its integrity check ({result})")


def _stop_using(path: str) -> dict[str, int] | None:
    """Take the current database out of WAL mode, which fails while anything else has it
    open (AdminError); return its id counters, or None if it cannot be read at all."""
    try:
        conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    except sqlite3.Error:
        return None
    try:
        conn.execute("PRAGMA journal_mode = DELETE").fetchone()
        return dict(conn.execute("SELECT name, seq FROM sqlite_sequence").fetchall())
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY \
                or "locked" in str(exc):
            raise AdminError(f"{path} is in use (is chat serve running on it?); stop the "
                             "server first") from None
        return None  # (no such table: a file without chat tables; or unreadable)
    except sqlite3.DatabaseError:  # not a database, or corrupt
        return None
    finally:
        conn.close()


def _raise_counters(path: str, counters: dict[str, int] | None) -> dict[str, int]:
    """Set the copy's id counters to at least ``counters`` (to its own plus the gap if None)
    and switch it to WAL; return the next id of each table."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        own = dict(conn.execute("SELECT name, seq FROM sqlite_sequence").fetchall())
        for table in _COUNTERS:
            seq = own.get(table, 0)
            seq = seq + RESTORE_ID_GAP if counters is None else max(seq, counters.get(table, 0))
            if table in own:
                conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = ?", (seq, table))
            else:
                conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)",
                             (table, seq))
            own[table] = seq
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode = WAL").fetchone()
    except sqlite3.Error as exc:
        raise AdminError(f"restore failed: {exc}") from None
    finally:
        conn.close()
    return {table: own[table] + 1 for table in _COUNTERS}


# -- vacuum -----------------------------------------------------------------------------------

PAGE_SIZES = tuple(1 << n for n in range(9, 17))  # what SQLite allows: 512 B to 64 KiB


@dataclass(frozen=True)
class VacuumResult:
    path: str
    page_size_before: int
    page_size: int
    bytes_before: int  # the database file once its WAL is folded in
    bytes_after: int


def vacuum(db_path: str, page_size: int = database.NEW_DATABASE_PAGE_SIZE) -> VacuumResult:
    """Rebuild the SQLite database at ``db_path`` with pages of ``page_size`` bytes.

    SQLite's ``VACUUM`` writes every table and index anew, packed, and frees unused pages;
    rows keep their ids, and the AUTOINCREMENT counters are kept, so no id is handed out
    again. It is how a database made before this package's 1 KiB pages gets them (docs/
    DESIGN.md). A WAL database cannot change its page size, so the database leaves WAL mode
    for it (which needs every other connection closed: refused while the server runs) and
    goes back to WAL after. ``VACUUM`` is one transaction: if it fails (it needs up to twice
    the database's size free: a temporary copy and a journal) the database is as it was.
    """
    db_path = os.path.abspath(db_path)
    if page_size not in PAGE_SIZES:
        raise AdminError(f"a page size is a power of two from 512 to 65536, not {page_size}")
    if not os.path.isfile(db_path):
        raise AdminError(f"no database at {db_path}")
    if _stop_using(db_path) is None:
        raise AdminError(f"{db_path} is not a chat database, or cannot be read")
    before = os.path.getsize(db_path)
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        try:
            old = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA page_size = {page_size}")
            conn.execute("VACUUM")
            new = conn.execute("PRAGMA page_size").fetchone()[0]
        finally:
            conn.execute("PRAGMA journal_mode = WAL").fetchone()
    except sqlite3.Error as exc:
        raise AdminError(f"vacuum failed: {exc}") from None
    finally:
        conn.close()
    return VacuumResult(db_path, old, new, before, os.path.getsize(db_path))


# -- schema -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MigrateResult:
    before: SchemaStatus
    head: str
    backup_path: str | None = None

    @property
    def changed(self) -> bool:
        return self.before.state != "current"


def migrate(db: Database, *, on_step: Callable[[str], None] | None = None,
            progress: Progress | None = None) -> MigrateResult:
    """Bring the database to head. A SQLite file behind head is backed up next to itself first
    (``<file>.before-<head>-<time>``); the upgrade runs in one transaction. ``on_step`` hears
    what is about to happen; ``progress`` follows the backup.
    """
    status = schema_status(db)
    head = head_revision()
    if status.state == "foreign":
        raise AdminError(f"{db.display_name} is not a chat database (it has other tables); "
                         "not touching it")
    if status.state == "ahead":
        raise AdminError(
            f"{db.display_name} was written by a newer version of chat "
            f"(revision {status.current}; this version ends at {head}); not touching it")
    if status.state == "current":
        return MigrateResult(status, head)
    backup_path = None
    if status.state == "behind" and db.is_sqlite:
        backup_path = f"{db.path}.before-{head}-{time.strftime('%Y%m%dT%H%M%S')}"
        if on_step:
            on_step(f"backing up to {backup_path}")
        backup(db, backup_path, progress=progress)
    if on_step:
        on_step(f"upgrading from {status.current or 'empty'} to {head} (one transaction)")
    upgrade(db)
    return MigrateResult(status, head, backup_path)
