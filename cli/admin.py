"""``chat admin``: administer a chat database directly (also while the server runs).

Thin: each command opens the database, calls ``chatserver.admin`` (or one repository read)
and prints. Refusals become one line on stderr with exit status 1 (click.ClickException).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from contextlib import contextmanager

import click
from sqlalchemy.exc import ArgumentError

from chatserver import admin as lib
from chatserver.domain import SearchPattern
from chatserver.errors import ChatError
from chatserver.passwords import HashParameters, PasswordHasher
from chatserver.storage.database import (
    NEW_DATABASE_PAGE_SIZE,
    Database,
    UnsuitableDatabase,
    shown_database,
)
from chatserver.storage.migrate import SchemaError, schema_status
from chatserver_cli.options import db_option

_DEFAULT_HASH = HashParameters()


def _now_ms() -> int:
    """The clock of every command (tests replace it)."""
    return lib.wall_clock_ms()


def _when(ms: int | None) -> str:
    if ms is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + "Z"


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + "Z"


def _age(ms: int) -> str:
    """A duration, coarse: 45s, 12m 05s, 3h 02m, 2d 04h."""
    seconds = max(ms // 1000, 0)
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _human(n: int) -> str:
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"


def _size(n: int) -> str:
    return f"{n} bytes ({_human(n)})"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _echo_json(value) -> None:
    click.echo(json.dumps(value, indent=None))


def _echo_fields(rows: list[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in rows) + 1
    for label, value in rows:
        click.echo(f"{(label + ':').ljust(width)}  {value}")


def _stderr_is_tty() -> bool:
    return sys.stderr.isatty()


class _Progress:
    """A ``progress(done, total)`` callback drawing a bar on stderr, only on a terminal."""

    def __init__(self, label: str):
        self.label = label
        self._bar = None
        self._shown = 0
        self._enabled = _stderr_is_tty()

    def __call__(self, done: int, total: int) -> None:
        if not self._enabled or total <= 0:
            return
        if self._bar is None:
            self._bar = click.progressbar(length=total, label=self.label, file=sys.stderr)
            self._bar.__enter__()
        self._bar.update(max(done - self._shown, 0))
        self._shown = max(done, self._shown)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


@contextmanager
def _progress(label: str):
    bar = _Progress(label)
    try:
        yield bar
    finally:
        bar.close()


def _step(message: str) -> None:
    """Say what long work is starting, on a terminal only (scripts get the result lines)."""
    if _stderr_is_tty():
        click.echo(message, err=True)


def _warn_if_world_readable(path: str) -> None:
    mode = lib.world_readable(path)
    if mode is not None:
        click.echo(f"Warning: {path} is readable by every user of this machine (mode {mode:04o}); "
                   f"a chat database holds password hashes: chmod 600 {path}", err=True)


@contextmanager
def _errors():
    """Domain, schema and admin refusals as one-line click errors."""
    try:
        yield
    except lib.AdminError as exc:
        raise click.ClickException(str(exc)) from None
    except (SchemaError, UnsuitableDatabase) as exc:
        raise click.ClickException(str(exc)) from None
    except ChatError as exc:
        raise click.ClickException(exc.message) from None


def _database(path_or_url: str) -> Database:
    try:
        return Database(path_or_url)
    except (ArgumentError, ImportError) as exc:
        raise click.ClickException(
            f"cannot use the database {shown_database(path_or_url)}: {exc}") from None


@contextmanager
def open_database(path_or_url: str):
    """Open an existing chat database at head; a clear one-line error otherwise."""
    if "://" not in path_or_url and not os.path.exists(path_or_url):
        raise click.ClickException(f"no database at {path_or_url}")
    db = _database(path_or_url)
    try:
        with _errors():
            lib.require_head(db, path_or_url)
            if db.is_sqlite:
                _warn_if_world_readable(db.path)
            yield db
    finally:
        db.dispose()


@contextmanager
def open_any_database(path_or_url: str, *, create: bool = False):
    """Open a database whatever its revision (for migrate and db-status).

    A missing SQLite file is an error, or with ``create`` is created with owner-only
    permissions; yields the database and whether it was created.
    """
    created = False
    if "://" not in path_or_url and not os.path.exists(path_or_url):
        if not create:
            raise click.ClickException(f"no database at {path_or_url}")
        with _errors():
            lib.create_private_file(path_or_url)
        created = True
    try:
        db = _database(path_or_url)
        try:
            if db.is_sqlite and not created:
                _warn_if_world_readable(db.path)
            with _errors():
                yield db, created
        finally:
            db.dispose()
    except BaseException:
        if created:  # leave nothing half-made behind
            for leftover in (path_or_url, path_or_url + "-wal", path_or_url + "-shm"):
                if os.path.exists(leftover):
                    os.remove(leftover)
        raise


@click.group()
def admin() -> None:
    """Administer a chat database directly.

    Works also while `chat serve` runs on the same database (except restore, which needs
    it stopped). Every command takes --db
    (a SQLite file or a SQLAlchemy URL); errors are one line on stderr with exit status 1.
    Details: docs/ADMIN.md.

    \b
    Example:
      chat admin list-accounts --db chat.db
      chat admin stats --db chat.db
      chat admin backup /var/backups/chat-$(date +%F).db --db chat.db
      chat admin restore /var/backups/chat-2026-11-24.db --db chat.db   # server stopped
    """


# -- accounts ---------------------------------------------------------------------------------


@admin.command("list-accounts", short_help="List accounts, optionally matching PATTERN.")
@click.argument("pattern", default="")
@db_option
@click.option("--json", "as_json", is_flag=True, help="One JSON array, for scripts.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header row.")
@click.option("--limit", type=click.IntRange(1), default=None, help="At most this many accounts.")
def list_accounts(pattern, db, as_json, as_csv, limit) -> None:
    """List accounts (name, created, last login, undelivered), optionally matching PATTERN.

    PATTERN uses * for any run and ? for one character, without regard to case.

    \b
    Example:
      chat admin list-accounts 'al*' --db chat.db --json
      chat admin list-accounts --db chat.db --csv --limit 100 > accounts.csv
    """
    if as_json and as_csv:
        raise click.ClickException("choose one of --json and --csv")
    with open_database(db) as database:
        compiled = SearchPattern.parse(pattern)
        rows = database.read(lambda repo: repo.account_summaries(compiled, limit))
    if as_json:
        click.echo(json.dumps([
            {"name": a.name, "created": _iso(a.created_at), "last_login": _iso(a.last_login_at),
             "undelivered": n} for a, n in rows], indent=None))
        return
    if as_csv:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["name", "created", "last_login", "undelivered"])
        for a, n in rows:
            writer.writerow([a.name, _iso(a.created_at), _iso(a.last_login_at) or "", n])
        click.echo(out.getvalue(), nl=False)
        return
    table = [("NAME", "CREATED", "LAST LOGIN", "UNDELIVERED")] + [
        (a.name, _when(a.created_at), _when(a.last_login_at), str(n)) for a, n in rows]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for r in table:
        click.echo("  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1]),
                              r[2].ljust(widths[2]), r[3].rjust(widths[3])]).rstrip())


@admin.command("show-account")
@click.argument("name")
@db_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def show_account(name, db, as_json) -> None:
    """Show one account and its waiting messages.

    Name, id, created, last login, how many messages wait for it and when the oldest of
    them was sent (times in UTC).

    \b
    Example:
      chat admin show-account alice --db chat.db
    """
    with open_database(db) as database:
        details = lib.show_account(database, name)
    a = details.account
    if as_json:
        _echo_json({"name": a.name, "id": a.id, "created": _iso(a.created_at),
                    "last_login": _iso(a.last_login_at), "undelivered": details.undelivered,
                    "oldest_undelivered": _iso(details.oldest_undelivered_at)})
        return
    oldest = details.oldest_undelivered_at
    _echo_fields([
        ("name", a.name),
        ("id", str(a.id)),
        ("created", _when(a.created_at)),
        ("last login", _when(a.last_login_at)),
        ("undelivered", str(details.undelivered)),
        ("oldest undelivered", "-" if oldest is None else
         f"{_when(oldest)} ({_age(_now_ms() - oldest)} ago)"),
    ])


@admin.command("delete-account")
@click.argument("name")
@db_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def delete_account(name, db, yes) -> None:
    """Delete an account and its waiting messages.

    The same as the protocol's delete: messages waiting for the account are discarded,
    what it sent stays deliverable. If a server runs on the database, the account's live
    sessions are ended within seconds.

    \b
    Example:
      chat admin delete-account mallory --db chat.db --yes
    """
    with open_database(db) as database:
        if not yes:
            details = lib.show_account(database, name)
            click.confirm(f"Delete account {details.account.name} and "
                          f"{_plural(details.undelivered, 'undelivered message')}?", abort=True)
        account, discarded = lib.delete_account(database, name)
    click.echo(f"deleted account {account.name}; "
               f"discarded {_plural(discarded, 'undelivered message')}")


@admin.command("reset-password")
@click.argument("name")
@db_option
@click.option("--password-stdin", is_flag=True,
              help="Read the new password from the first line of standard input "
                   "instead of prompting.")
@click.option("--argon2-time-cost", type=click.IntRange(1), default=_DEFAULT_HASH.time_cost,
              hidden=True, help="Argon2id passes per password hash.")
@click.option("--argon2-memory-kib", type=click.IntRange(8 * _DEFAULT_HASH.parallelism),
              default=_DEFAULT_HASH.memory_kib, hidden=True,
              help="Argon2id memory per password hash, in KiB.")
def reset_password(name, db, password_stdin, argon2_time_cost, argon2_memory_kib) -> None:
    """Set a new password for an account.

    The password is prompted for twice without echo, or read from the first line of
    standard input with --password-stdin (for scripts).

    \b
    Example:
      chat admin reset-password alice --db chat.db
      printf '%s\\n' "$NEW_PASSWORD" | chat admin reset-password alice --password-stdin
    """
    with open_database(db) as database:
        lib.show_account(database, name)  # fail before asking for a password
        if password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
            if not password:
                raise click.ClickException("no password on standard input")
        else:
            password = click.prompt("New password", hide_input=True, confirmation_prompt=True)
        hasher = PasswordHasher(HashParameters(time_cost=argon2_time_cost,
                                               memory_kib=argon2_memory_kib))
        account = lib.reset_password(database, name, password, hasher)
    click.echo(f"password of {account.name} reset")


# -- the database -----------------------------------------------------------------------------


@admin.command("stats")
@db_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def stats(db, as_json) -> None:
    """Show counts, oldest waiting message, size.

    Accounts, undelivered messages, the age of the oldest undelivered message, the size of
    the database (for SQLite: the file and its WAL) and its schema revision.

    \b
    Example:
      chat admin stats --db chat.db --json
    """
    with open_database(db) as database:
        s = lib.stats(database)
    now = _now_ms()
    age_ms = None if s.oldest_undelivered_at is None else max(now - s.oldest_undelivered_at, 0)
    if as_json:
        _echo_json({"accounts": s.accounts, "undelivered": s.undelivered,
                    "oldest_undelivered": _iso(s.oldest_undelivered_at),
                    "oldest_undelivered_age_seconds": None if age_ms is None else age_ms // 1000,
                    "database_bytes": s.database_bytes, "revision": s.revision,
                    "head_revision": s.head})
        return
    _echo_fields([
        ("accounts", str(s.accounts)),
        ("undelivered messages", str(s.undelivered)),
        ("oldest undelivered age", "-" if age_ms is None else
         f"{_age(age_ms)} (sent {_when(s.oldest_undelivered_at)})"),
        ("database size", "unknown" if s.database_bytes is None else _size(s.database_bytes)),
        ("schema revision", f"{s.revision} (head)" if s.revision == s.head
         else f"{s.revision} (head is {s.head})"),
    ])


@admin.command("backup")
@click.argument("dest", type=click.Path(dir_okay=False))
@db_option
def backup(dest, db) -> None:
    """Copy a live database consistently to DEST.

    For SQLite files; safe while the server runs. The copy is taken with SQLite's online
    backup API from one snapshot, checked, and written with owner-only permissions.
    To put it back: chat admin restore, with the server stopped (docs/ADMIN.md).

    \b
    Example:
      chat admin backup /var/backups/chat-2026-11-24.db --db /var/lib/chat/chat.db
    """
    with open_database(db) as database, _progress("backing up") as bar:
        _step(f"backing up {database.display_name} to {os.path.abspath(dest)}")
        result = lib.backup(database, dest, progress=bar)
    click.echo(f"backed up {database.display_name} to {result.path} ({_human(result.bytes)})")


@admin.command("restore", short_help="Replace the database with a backup (server stopped).")
@click.argument("backup_path", metavar="BACKUP", type=click.Path(dir_okay=False))
@db_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def restore(backup_path, db, yes) -> None:
    """Replace the database with a backup.

    For SQLite files. Refuses while anything has the database open (stop chat serve
    first). The current files are renamed aside, never deleted; the backup is checked and
    copied into place owner-only; ids continue above every id handed out before, so no
    client mistakes a new message for one it has seen. Anything newer than the backup is
    lost (docs/ADMIN.md).

    \b
    Example:
      chat admin restore /var/backups/chat-2026-11-24.db --db /var/lib/chat/chat.db
    """
    if "://" in db:
        raise click.ClickException("restore replaces SQLite files; for PostgreSQL use pg_restore")
    if not yes:
        click.confirm(f"Replace {db} with {backup_path}? What happened since the backup is "
                      "lost", abort=True)
    with _errors(), _progress("restoring") as bar:
        _step(f"restoring {os.path.abspath(db)} from {os.path.abspath(backup_path)}")
        result = lib.restore(backup_path, db, progress=bar)
    if result.set_aside:
        click.echo(f"set the replaced database aside as {result.set_aside}")
    if result.gap:
        click.echo(f"the replaced database could not be read: ids jump by {lib.RESTORE_ID_GAP:,}")
    click.echo(f"restored {result.path} from {os.path.abspath(backup_path)}; next message id "
               f"{result.next_ids['messages']}, next account id {result.next_ids['accounts']}")
    with open_any_database(result.path) as (database, _created):
        status = schema_status(database)
    if status.state == "behind":
        click.echo(f"the backup is at revision {status.current}; chat serve upgrades it at "
                   f"start-up, or run: chat admin migrate --db {shown_database(db)}")


@admin.command("purge")
@db_option
@click.option("--older-than", "older_than", type=click.IntRange(1), metavar="DAYS",
              help="Purge undelivered messages sent more than DAYS days ago.")
@click.option("--receipts-older-than", type=click.IntRange(1), metavar="DAYS",
              help="Purge send receipts (the memory of client_msg_id for retried sends) "
                   "older than DAYS days.")
@click.option("--dry-run", is_flag=True, help="Only count what would be purged.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=lib.PURGE_BATCH_SIZE,
              show_default=True, help="Rows deleted per transaction.")
def purge(db, older_than, receipts_older_than, dry_run, yes, batch_size) -> None:
    """Purge old undelivered messages and receipts.

    Deletes what the retention policy allows (docs/ADMIN.md): undelivered messages sent
    more than --older-than days ago, and send receipts older than --receipts-older-than
    days. --dry-run only counts; without --yes it asks first. Rows go in small
    transactions, so a running server is never held up for long.

    \b
    Example:
      chat admin purge --older-than 90 --dry-run --db chat.db
      chat admin purge --older-than 90 --receipts-older-than 7 --yes --db chat.db
    """
    if older_than is None and receipts_older_than is None:
        raise click.ClickException("nothing to purge: give --older-than and/or "
                                   "--receipts-older-than")
    now = _now_ms()
    messages_before = None if older_than is None else lib.cutoff(older_than, now)
    receipts_before = None if receipts_older_than is None else lib.cutoff(receipts_older_than, now)
    with open_database(db) as database:
        plan = lib.plan_purge(database, messages_before=messages_before,
                              receipts_before=receipts_before)
        lines = []
        if messages_before is not None:
            lines.append(f"{_plural(plan.messages, 'undelivered message')} "
                         f"(for {_plural(plan.recipients, 'account')}) "
                         f"sent before {_when(messages_before)}")
        if receipts_before is not None:
            lines.append(f"{_plural(plan.receipts, 'send receipt')} "
                         f"created before {_when(receipts_before)}")
        if dry_run:
            for line in lines:
                click.echo(f"would purge {line}")
            return
        if plan.messages + plan.receipts == 0:
            click.echo("nothing to purge")
            return
        if not yes:
            click.confirm("Purge " + " and ".join(lines) + "?", abort=True)
        with _progress("purging") as bar:
            done = lib.purge(database, messages_before=messages_before,
                             receipts_before=receipts_before, batch_size=batch_size,
                             progress=bar)
    if messages_before is not None:
        click.echo(f"purged {_plural(done.messages, 'undelivered message')} "
                   f"sent before {_when(messages_before)}")
    if receipts_before is not None:
        click.echo(f"purged {_plural(done.receipts, 'send receipt')} "
                   f"created before {_when(receipts_before)}")


@admin.command("vacuum", short_help="Rebuild the database, with 1 KiB pages (server stopped).")
@db_option
@click.option("--page-size", type=click.Choice([str(n) for n in lib.PAGE_SIZES]),
              default=str(NEW_DATABASE_PAGE_SIZE), show_default=True,
              help="Bytes per page: what a new database gets unless you choose otherwise.")
def vacuum(db, page_size) -> None:
    """Rebuild the database, packed, with 1 KiB pages.

    For SQLite files. Refuses while anything has the database open (stop chat serve
    first). Rows keep their ids and no id is handed out again. A database made before
    chat used 1 KiB pages keeps 4 KiB ones until this is run (docs/DESIGN.md). It needs up
    to twice the database's size free on the disk, and leaves the database as it was if
    it fails.

    \b
    Example:
      chat admin vacuum --db /var/lib/chat/chat.db
    """
    if "://" in db:
        raise click.ClickException("vacuum rebuilds SQLite files; PostgreSQL has VACUUM FULL")
    with open_database(db):  # a chat database at head, or a clear refusal
        pass
    with _errors():
        _step(f"vacuuming {os.path.abspath(db)}")
        result = lib.vacuum(db, int(page_size))
    click.echo(f"vacuumed {result.path}: {_human(result.bytes_before)} -> "
               f"{_human(result.bytes_after)}, pages of {result.page_size_before:,} -> "
               f"{result.page_size:,} bytes")


@admin.command("migrate")
@db_option
def migrate(db) -> None:
    """Upgrade the schema to head (or create it).

    Brings the database to this version's head revision, creating it if missing. A SQLite
    file behind head is first backed up next to itself; the upgrade runs in one
    transaction. A new SQLite file is created readable by its owner only.

    \b
    Example:
      chat admin migrate --db /var/lib/chat/chat.db
    """
    with open_any_database(db, create=True) as (database, created), \
            _progress("backing up") as bar:
        result = lib.migrate(database, on_step=_step, progress=bar)
    name = database.display_name
    if created:
        click.echo(f"created {name} at revision {result.head}")
    elif not result.changed:
        click.echo(f"{name} is already at head revision {result.head}; nothing to do")
    else:
        if result.backup_path:
            click.echo(f"backed up {name} to {result.backup_path}")
        click.echo(f"upgraded {name} from {result.before.current or 'empty'} to {result.head}")


@admin.command("db-status")
@db_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def db_status(db, as_json) -> None:
    """Show the schema revision; exit 1 if behind.

    Prints the database's revision and this version's head revision. Exits 1 when the
    database is behind (run migrate), empty, or written by a newer version.

    \b
    Example:
      chat admin db-status --db chat.db || chat admin migrate --db chat.db
    """
    with open_any_database(db) as (database, _created):
        status = schema_status(database)
    name = database.display_name
    if status.state == "foreign":
        raise click.ClickException(f"{name} is not a chat database (it has other tables)")
    if as_json:
        _echo_json({"current": status.current, "head": status.head, "state": status.state})
    else:
        _echo_fields([("current revision", status.current or "none"),
                      ("head revision", status.head)])
    if status.state == "behind":
        raise click.ClickException(f"{name} is behind head; run: chat admin migrate --db "
                                   f"{shown_database(db)}")
    if status.state == "empty":
        raise click.ClickException(f"{name} has no chat schema yet; "
                                   f"run: chat admin migrate --db {shown_database(db)}")
    if status.state == "ahead":
        raise click.ClickException(
            f"{name} was written by a newer version of chat (revision {status.current}); "
            "upgrade chat to use it")
