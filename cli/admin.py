"""``chat admin``: administer a chat database directly (also while the server runs)."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager

import click

from chatserver.domain import SearchPattern
from chatserver.errors import ChatError
from chatserver.storage.database import Database
from chatserver.storage.migrate import SchemaError, schema_status
from chatserver_cli.options import db_option


def _when(ms: int | None) -> str:
    if ms is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + "Z"


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + "Z"


@contextmanager
def open_database(path_or_url: str):
    """Open an existing chat database at head; a clear one-line error otherwise."""
    if "://" not in path_or_url:
        import os

        if not os.path.exists(path_or_url):
            raise click.ClickException(f"no database at {path_or_url}")
    db = Database(path_or_url)
    try:
        status = schema_status(db)
        if status.state in ("empty", "foreign"):
            raise click.ClickException(f"{db.display_name} is not a chat database")
        if status.state == "ahead":
            raise click.ClickException(
                f"{db.display_name} was written by a newer version of chat "
                f"(revision {status.current}); upgrade chat to use it")
        if status.state == "behind":
            raise click.ClickException(
                f"{db.display_name} is at revision {status.current}, behind {status.head}; "
                f"run: chat admin migrate --db {path_or_url}")
        yield db
    except (SchemaError, ChatError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        db.dispose()


@click.group()
def admin() -> None:
    """Administer a chat database directly.

    \b
    Example:
      chat admin list-accounts --db chat.db
    """


@admin.command("list-accounts")
@click.argument("pattern", default="")
@db_option
@click.option("--json", "as_json", is_flag=True, help="One JSON array, for scripts.")
def list_accounts(pattern, db, as_json) -> None:
    """List accounts (name, created, last login, undelivered), optionally matching PATTERN.

    PATTERN uses * for any run and ? for one character, without regard to case.

    \b
    Example:
      chat admin list-accounts 'al*' --db chat.db --json
    """
    with open_database(db) as database:
        compiled = SearchPattern.parse(pattern)
        rows = database.read(lambda repo: repo.account_summaries(compiled))
    if as_json:
        click.echo(json.dumps([
            {"name": a.name, "created": _iso(a.created_at), "last_login": _iso(a.last_login_at),
             "undelivered": n} for a, n in rows], indent=None))
        return
    table = [("NAME", "CREATED", "LAST LOGIN", "UNDELIVERED")] + [
        (a.name, _when(a.created_at), _when(a.last_login_at), str(n)) for a, n in rows]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for r in table:
        click.echo("  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1]),
                              r[2].ljust(widths[2]), r[3].rjust(widths[3])]).rstrip())
