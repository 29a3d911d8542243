"""``chat admin`` commands through click's CliRunner, and against a live ``chat serve``."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
import threading
from contextlib import contextmanager

import click
import pytest
from click.testing import CliRunner

from chatserver import admin as lib
from chatserver.client import ServerError
from chatserver.passwords import HashParameters, PasswordHasher
from chatserver.storage.database import Database
from chatserver.storage.migrate import ensure_schema, head_revision, schema_status, upgrade
from chatserver_cli import admin as admin_cli
from chatserver_cli.main import cli
from tests.sqlite_files import query

DAY = lib.DAY_MS
NOW = 1_790_000_000_000  # 2026-09-21 14:13:20Z
HEAD = head_revision()
CHEAP_HASH = ["--argon2-time-cost", "1", "--argon2-memory-kib", "64"]


def at(ms: int) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + "Z"


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    monkeypatch.setattr(admin_cli, "_now_ms", lambda: NOW)


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, ["admin", *args], input=input)


def make_db(path, accounts=(), messages=()) -> str:
    """A chat database at head, owner-only, with accounts (name, created) and messages
    (sender, recipient, sent_at, client_msg_id)."""
    db = Database(str(path))
    try:
        ensure_schema(db)
        ids = {}
        with db.unit_of_work() as uow:
            for name, created in accounts:
                ids[name] = uow.repo.add_account(name, name.casefold(), "no-hash", created)
            for sender, recipient, sent_at, client_msg_id in messages:
                uow.repo.add_message(ids[sender], ids[recipient].id, "hi", sent_at, client_msg_id)
            uow.commit()
    finally:
        db.dispose()
    os.chmod(path, 0o600)
    return str(path)


@pytest.fixture
def empty_db(tmp_path) -> str:
    return make_db(tmp_path / "empty.db")


@pytest.fixture
def full_db(tmp_path) -> str:
    """alice (2 waiting, oldest 40 days), Bob (1 waiting), carol (none)."""
    return make_db(
        tmp_path / "chat.db",
        accounts=[("alice", NOW - 50 * DAY), ("Bob", NOW - 45 * DAY), ("carol", NOW - DAY)],
        messages=[("Bob", "alice", NOW - 40 * DAY, "b1"), ("carol", "alice", NOW - 2 * DAY, ""),
                  ("alice", "Bob", NOW - 35 * DAY, "a1")],
    )


def one_line_error(result, message: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr == f"Error: {message}\n"


# -- help -------------------------------------------------------------------------------------


def test_every_admin_command_has_a_summary_and_an_example():
    group = cli.commands["admin"]
    assert set(group.commands) == {
        "list-accounts", "show-account", "delete-account", "reset-password", "stats", "backup",
        "restore", "purge", "vacuum", "migrate", "db-status"}
    for name, command in [("admin", group), *group.commands.items()]:
        args = ["admin", "--help"] if name == "admin" else ["admin", name, "--help"]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, name
        ctx = click.Context(command, info_name=name)
        assert command.get_short_help_str(limit=200).strip(), name
        assert not command.get_short_help_str().endswith("..."), name  # fits the listing
        assert "Example:" in result.output, name
        if name != "admin":
            assert "--db" in result.output, name
            assert command.get_help(ctx).count("\n") > 3, name


def test_group_help_lists_every_command():
    result = CliRunner().invoke(cli, ["admin", "--help"])
    for name in cli.commands["admin"].commands:
        assert name in result.output


# -- errors common to every command -----------------------------------------------------------

EVERY_COMMAND = [
    ["list-accounts"], ["show-account", "alice"], ["delete-account", "alice", "--yes"],
    ["reset-password", "alice", "--password-stdin"], ["stats"], ["backup", "copy.db"],
    ["purge", "--older-than", "30", "--yes"], ["db-status"],
]


@pytest.mark.parametrize("args", EVERY_COMMAND, ids=lambda a: a[0])
def test_missing_file_is_one_line_and_not_created(tmp_path, args):
    missing = str(tmp_path / "missing.db")
    result = run(*args, "--db", missing, input="pw-pw-pw-pw\n")
    one_line_error(result, f"no database at {missing}")
    assert not os.path.exists(missing)


@pytest.mark.parametrize("args", EVERY_COMMAND + [["migrate"]], ids=lambda a: a[0])
def test_not_a_chat_database(tmp_path, args):
    path = tmp_path / "notes.txt"
    path.write_text("shopping list\n" * 100)
    os.chmod(path, 0o600)
    result = run(*args, "--db", str(path), input="pw-pw-pw-pw\n")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert re.fullmatch(rf"Error: {re.escape(str(path))} is not a chat database.*\n", result.stderr)
    assert "Traceback" not in result.output
    assert path.read_text() == "shopping list\n" * 100


@pytest.mark.parametrize("args", EVERY_COMMAND[:-1], ids=lambda a: a[0])  # db-status: below
def test_database_from_a_newer_version(empty_db, args):
    db = Database(empty_db)
    with db.write_engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    db.dispose()
    result = run(*args, "--db", empty_db, input="pw-pw-pw-pw\n")
    one_line_error(result, f"{empty_db} was written by a newer version of chat (revision 9999); "
                           "upgrade chat to use it")


def test_database_behind_head_points_at_migrate(tmp_path):
    path = str(tmp_path / "old.db")
    db = Database(path)
    upgrade(db, "0001")
    db.dispose()
    os.chmod(path, 0o600)
    result = run("stats", "--db", path)
    one_line_error(result, f"{path} is at revision 0001, behind {HEAD}; "
                           f"run: chat admin migrate --db {path}")


def test_world_readable_file_gets_a_warning(empty_db):
    os.chmod(empty_db, 0o644)
    result = run("stats", "--db", empty_db)
    assert result.exit_code == 0
    assert result.stderr == (f"Warning: {empty_db} is readable by every user of this machine "
                             f"(mode 0644); a chat database holds password hashes: "
                             f"chmod 600 {empty_db}\n")
    os.chmod(empty_db, 0o640)
    assert run("stats", "--db", empty_db).stderr == ""


def test_database_option_from_the_environment(full_db):
    result = CliRunner().invoke(cli, ["admin", "stats", "--json"],
                                env={"CHAT_ADMIN_STATS_DB": full_db})
    assert result.exit_code == 0 and json.loads(result.stdout)["accounts"] == 3


# -- list-accounts ----------------------------------------------------------------------------


def test_list_accounts_table(full_db):
    result = run("list-accounts", "--db", full_db)
    assert result.exit_code == 0 and result.stderr == ""
    a, b, c = at(NOW - 50 * DAY), at(NOW - 45 * DAY), at(NOW - DAY)
    assert result.stdout == (
        "NAME   CREATED               LAST LOGIN            UNDELIVERED\n"
        f"alice  {a}  {a}            2\n"
        f"Bob    {b}  {b}            1\n"
        f"carol  {c}  {c}            0\n")


def test_list_accounts_json_csv_limit_pattern(full_db):
    as_json = json.loads(run("list-accounts", "--db", full_db, "--json").stdout)
    assert [r["name"] for r in as_json] == ["alice", "Bob", "carol"]
    assert as_json[1] == {"name": "Bob", "created": "2026-08-07T14:13:20Z",
                          "last_login": "2026-08-07T14:13:20Z", "undelivered": 1}
    result = run("list-accounts", "--db", full_db, "--csv", "--limit", "2")
    assert result.exit_code == 0
    assert result.stdout == ("name,created,last_login,undelivered\n"
                             "alice,2026-08-02T14:13:20Z,2026-08-02T14:13:20Z,2\n"
                             "Bob,2026-08-07T14:13:20Z,2026-08-07T14:13:20Z,1\n")
    assert list(csv.reader(io.StringIO(result.stdout))) == [
        ["name", "created", "last_login", "undelivered"],
        ["alice", "2026-08-02T14:13:20Z", "2026-08-02T14:13:20Z", "2"],
        ["Bob", "2026-08-07T14:13:20Z", "2026-08-07T14:13:20Z", "1"]]
    assert run("list-accounts", "B*", "--db", full_db, "--json", "--limit", "5").stdout == (
        '[{"name": "Bob", "created": "2026-08-07T14:13:20Z", '
        '"last_login": "2026-08-07T14:13:20Z", "undelivered": 1}]\n')
    assert run("list-accounts", "zz*", "--db", full_db, "--json").stdout == "[]\n"


def test_list_accounts_refuses_two_formats_and_bad_limit(full_db):
    one_line_error(run("list-accounts", "--db", full_db, "--json", "--csv"),
                   "choose one of --json and --csv")
    assert run("list-accounts", "--db", full_db, "--limit", "0").exit_code == 2


# -- show-account -----------------------------------------------------------------------------


def test_show_account(full_db):
    result = run("show-account", "ALICE", "--db", full_db)
    assert result.exit_code == 0
    assert result.stdout == (
        "name:                alice\n"
        "id:                  1\n"
        f"created:             {at(NOW - 50 * DAY)}\n"
        f"last login:          {at(NOW - 50 * DAY)}\n"
        "undelivered:         2\n"
        f"oldest undelivered:  {at(NOW - 40 * DAY)} (40d 00h ago)\n")
    carol = run("show-account", "carol", "--db", full_db).stdout
    assert carol.endswith("undelivered:         0\noldest undelivered:  -\n")


def test_show_account_json(full_db):
    result = run("show-account", "bob", "--db", full_db, "--json")
    assert json.loads(result.stdout) == {
        "name": "Bob", "id": 2, "created": "2026-08-07T14:13:20Z",
        "last_login": "2026-08-07T14:13:20Z", "undelivered": 1,
        "oldest_undelivered": "2026-08-17T14:13:20Z"}


def test_show_account_unknown(full_db):
    one_line_error(run("show-account", "zed", "--db", full_db), "there is no account named 'zed'")


# -- delete-account ---------------------------------------------------------------------------


def test_delete_account_with_yes(full_db):
    result = run("delete-account", "Alice", "--yes", "--db", full_db)
    assert result.exit_code == 0
    assert result.stdout == "deleted account alice; discarded 2 undelivered messages\n"
    names = [r["name"] for r in json.loads(run("list-accounts", "--db", full_db, "--json").stdout)]
    assert names == ["Bob", "carol"]
    # What alice sent stays deliverable to Bob.
    assert json.loads(run("show-account", "bob", "--db", full_db, "--json").stdout)[
        "undelivered"] == 1


def test_delete_account_asks_first(full_db):
    result = run("delete-account", "carol", "--db", full_db, input="n\n")
    assert result.exit_code == 1
    assert result.stdout == "Delete account carol and 0 undelivered messages? [y/N]: n\n"
    assert "Aborted" in result.stderr
    assert run("show-account", "carol", "--db", full_db).exit_code == 0
    result = run("delete-account", "bob", "--db", full_db, input="y\n")
    assert result.exit_code == 0
    assert result.stdout == ("Delete account Bob and 1 undelivered message? [y/N]: y\n"
                             "deleted account Bob; discarded 1 undelivered message\n")


def test_delete_unknown_account(full_db):
    one_line_error(run("delete-account", "zed", "--yes", "--db", full_db),
                   "there is no account named 'zed'")


# -- reset-password ---------------------------------------------------------------------------


def stored_hash(path: str, name: str) -> str:
    db = Database(path)
    try:
        return db.read(lambda repo: repo.get_by_key(name))[1]
    finally:
        db.dispose()


def test_reset_password_from_stdin(full_db):
    result = run("reset-password", "alice", "--password-stdin", "--db", full_db, *CHEAP_HASH,
                 input="a-new-password\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "password of alice reset\n"
    hasher = PasswordHasher(HashParameters(time_cost=1, memory_kib=64))
    assert hasher.verify(stored_hash(full_db, "alice"), "a-new-password")


def test_reset_password_prompts_without_echo(full_db):
    result = run("reset-password", "bob", "--db", full_db, *CHEAP_HASH,
                 input="another-password\nanother-password\n")
    assert result.exit_code == 0, result.output
    assert "another-password" not in result.output
    assert result.stdout == ("New password: \nRepeat for confirmation: \n"
                             "password of Bob reset\n")
    hasher = PasswordHasher(HashParameters(time_cost=1, memory_kib=64))
    assert hasher.verify(stored_hash(full_db, "bob"), "another-password")


def test_reset_password_cost_from_the_environment(full_db):
    result = CliRunner().invoke(
        cli, ["admin", "reset-password", "carol", "--password-stdin", "--db", full_db],
        input="carols-new-pw\n",
        env={"CHAT_ADMIN_RESET_PASSWORD_ARGON2_TIME_COST": "1",
             "CHAT_ADMIN_RESET_PASSWORD_ARGON2_MEMORY_KIB": "64"})
    assert result.exit_code == 0, result.output
    assert "m=64,t=1" in stored_hash(full_db, "carol")


def test_reset_password_refusals(full_db):
    before = stored_hash(full_db, "alice")
    one_line_error(run("reset-password", "alice", "--password-stdin", "--db", full_db,
                       *CHEAP_HASH, input="short\n"),
                   "passwords need at least 8 characters")
    one_line_error(run("reset-password", "alice", "--password-stdin", "--db", full_db,
                       *CHEAP_HASH, input=""),
                   "no password on standard input")
    one_line_error(run("reset-password", "zed", "--password-stdin", "--db", full_db,
                       *CHEAP_HASH, input="long-enough-pw\n"),
                   "there is no account named 'zed'")
    assert stored_hash(full_db, "alice") == before


# -- stats ------------------------------------------------------------------------------------


def db_bytes(path: str) -> int:
    wal = path + "-wal"
    return os.path.getsize(path) + (os.path.getsize(wal) if os.path.exists(wal) else 0)


def test_stats(full_db):
    result = run("stats", "--db", full_db)
    assert result.exit_code == 0
    size = db_bytes(full_db)
    assert result.stdout == (
        "accounts:                3\n"
        "undelivered messages:    3\n"
        f"oldest undelivered age:  40d 00h (sent {at(NOW - 40 * DAY)})\n"
        f"database size:           {size} bytes ({size / 1024:.1f} KiB)\n"
        f"schema revision:         {HEAD} (head)\n")


def test_stats_json(full_db, empty_db):
    assert json.loads(run("stats", "--db", full_db, "--json").stdout) == {
        "accounts": 3, "undelivered": 3, "oldest_undelivered": "2026-08-12T14:13:20Z",
        "oldest_undelivered_age_seconds": 40 * 86400, "database_bytes": db_bytes(full_db),
        "revision": HEAD, "head_revision": HEAD}
    empty = json.loads(run("stats", "--db", empty_db, "--json").stdout)
    assert (empty["accounts"], empty["oldest_undelivered"],
            empty["oldest_undelivered_age_seconds"]) == (0, None, None)


def test_stats_of_an_empty_database_table(empty_db):
    lines = run("stats", "--db", empty_db).stdout.splitlines()
    assert lines[:3] == ["accounts:                0", "undelivered messages:    0",
                         "oldest undelivered age:  -"]


# -- backup -----------------------------------------------------------------------------------


def test_backup(full_db, tmp_path):
    dest = tmp_path / "copy.db"
    result = run("backup", str(dest), "--db", full_db)
    assert result.exit_code == 0, result.output
    size = os.path.getsize(dest)
    assert result.stdout == f"backed up {full_db} to {dest} ({size / 1024:.1f} KiB)\n"
    assert result.stderr == ""
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600
    assert json.loads(run("stats", "--db", str(dest), "--json").stdout)["accounts"] == 3


def test_backup_relative_destination(full_db, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("backup", "rel.db", "--db", full_db)
    assert result.exit_code == 0
    assert result.stdout.startswith(f"backed up {full_db} to {tmp_path / 'rel.db'} (")


def test_backup_refuses_to_overwrite(full_db, tmp_path):
    (tmp_path / "copy.db").write_text("old backup")
    one_line_error(run("backup", str(tmp_path / "copy.db"), "--db", full_db),
                   f"{tmp_path / 'copy.db'} already exists; choose a new name")
    assert (tmp_path / "copy.db").read_text() == "old backup"


# -- restore ----------------------------------------------------------------------------------


def add_later(path: str, name: str, messages: int) -> tuple[int, int]:
    """What happens after a backup: an account and messages; return their highest ids."""
    db = Database(path)
    try:
        with db.unit_of_work() as uow:
            account = uow.repo.add_account(name, name.casefold(), "no-hash", NOW)
            ids = [uow.repo.add_message(account, account.id, "later", NOW, f"later{i}")
                   for i in range(messages)]
            uow.commit()
    finally:
        db.dispose()
    return account.id, max(ids)


def next_ids(path: str, probe: str = "probe") -> tuple[int, int]:
    """The ids the database hands out next: (account, message)."""
    db = Database(path)
    try:
        with db.unit_of_work() as uow:
            account = uow.repo.add_account(probe, probe, "no-hash", NOW)
            message = uow.repo.add_message(account, account.id, "probe", NOW, "")
            uow.commit()
    finally:
        db.dispose()
    return account.id, message


def names(path: str) -> list[str]:
    return [r["name"] for r in json.loads(run("list-accounts", "--db", path, "--json").stdout)]


@contextmanager
def held_open(path: str):
    """Another process with the database open, as a running server has it."""
    hold_open = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
                 "c.execute('SELECT count(*) FROM accounts').fetchall(); "
                 "print('open', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", hold_open, path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        yield
    finally:
        holder.communicate("", timeout=30)


def in_use(path: str) -> str:
    return f"{path} is in use (is chat serve running on it?); stop the server first"


def test_restore_puts_the_backup_back_and_ids_keep_growing(full_db, tmp_path):
    backup = str(tmp_path / "backup.db")
    assert run("backup", backup, "--db", full_db).exit_code == 0
    last_account, last_message = add_later(full_db, "dave", 5)  # lost by the restore

    result = run("restore", backup, "--db", full_db, "--yes")
    assert result.exit_code == 0, result.output
    assert names(full_db) == ["alice", "Bob", "carol"]
    assert stat.S_IMODE(os.stat(full_db).st_mode) == 0o600
    # the replaced database is kept, whole, under a new name
    aside = [f for f in os.listdir(tmp_path) if f.startswith("chat.db.before-restore-")]
    assert len(aside) == 1
    assert names(str(tmp_path / aside[0])) == ["alice", "Bob", "carol", "dave"]
    assert result.stdout.splitlines() == [
        f"set the replaced database aside as {tmp_path / aside[0]}",
        (f"restored {full_db} from {backup}; next message id {last_message + 1}, "
         f"next account id {last_account + 1}")]
    # no id handed out before the restore is handed out again
    assert next_ids(full_db) == (last_account + 1, last_message + 1)


def test_restore_refuses_while_the_database_is_open(full_db, tmp_path):
    backup = str(tmp_path / "backup.db")
    assert run("backup", backup, "--db", full_db).exit_code == 0
    add_later(full_db, "dave", 1)
    with held_open(full_db):
        one_line_error(run("restore", backup, "--db", full_db, "--yes"), in_use(full_db))
    assert names(full_db) == ["alice", "Bob", "carol", "dave"]  # untouched
    assert not [f for f in os.listdir(tmp_path) if "before-restore" in f or "restoring" in f]


def test_restore_refuses_what_is_not_a_chat_backup(full_db, tmp_path):
    (tmp_path / "notes.txt").write_text("not a database at all " * 100)
    sqlite3_db = tmp_path / "other.db"
    conn = sqlite3.connect(sqlite3_db)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    result = run("restore", str(tmp_path / "notes.txt"), "--db", full_db, "--yes")
    assert result.exit_code == 1 and "cannot read the backup" in result.stderr
    one_line_error(run("restore", str(sqlite3_db), "--db", full_db, "--yes"),
                   f"{sqlite3_db} is not a chat database")
    one_line_error(run("restore", str(tmp_path / "missing.db"), "--db", full_db, "--yes"),
                   f"no backup at {tmp_path / 'missing.db'}")
    one_line_error(run("restore", full_db, "--db", full_db, "--yes"),
                   "the backup and the database are the same file")
    assert names(full_db) == ["alice", "Bob", "carol"]
    assert not [f for f in os.listdir(tmp_path) if "before-restore" in f or "restoring" in f]


def test_restore_over_an_unreadable_database_jumps_the_ids(full_db, tmp_path):
    backup = str(tmp_path / "backup.db")
    assert run("backup", backup, "--db", full_db).exit_code == 0
    backup_next = next_ids(backup)  # (this probe adds rows to the backup: fine, it is a copy)
    with open(full_db, "r+b") as damaged:  # the reason one restores
        damaged.write(b"\0" * 4096)
    result = run("restore", backup, "--db", full_db, "--yes")
    assert result.exit_code == 0, result.output
    assert f"ids jump by {lib.RESTORE_ID_GAP:,}" in result.stdout
    assert next_ids(full_db, "probe2") == (backup_next[0] + 1 + lib.RESTORE_ID_GAP,
                                 backup_next[1] + 1 + lib.RESTORE_ID_GAP)


def test_restore_into_a_new_place_and_asks_first(full_db, tmp_path):
    backup = str(tmp_path / "backup.db")
    assert run("backup", backup, "--db", full_db).exit_code == 0
    fresh = str(tmp_path / "fresh.db")
    result = run("restore", backup, "--db", fresh, input="n\n")
    assert result.exit_code == 1 and "Aborted" in result.output
    assert not os.path.exists(fresh)
    result = run("restore", backup, "--db", fresh, input="y\n")
    assert result.exit_code == 0, result.output
    assert names(fresh) == ["alice", "Bob", "carol"]
    assert "set the replaced database aside" not in result.stdout


# -- vacuum -----------------------------------------------------------------------------------


def contents(path: str) -> dict[str, list[tuple]]:
    return {table: sorted(query(path, f"SELECT * FROM {table}"))
            for table in ("accounts", "messages", "send_receipts", "sqlite_sequence",
                          "alembic_version")}


def with_4_kib_pages(path: str) -> str:
    """The database as one made before chat created 1 KiB pages (SQLite's 4 KiB)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = DELETE").fetchone()
        conn.execute("PRAGMA page_size = 4096")
        conn.execute("VACUUM")
        conn.execute("PRAGMA journal_mode = WAL").fetchone()
    finally:
        conn.close()
    assert query(path, "PRAGMA page_size") == [(4096,)]
    return path


def test_vacuum_gives_an_old_database_1_kib_pages_and_keeps_everything(full_db):
    with_4_kib_pages(full_db)
    last_account, last_message = add_later(full_db, "dave", 3)
    db = Database(full_db)
    try:  # an acknowledged message with the highest id: its id must not come back
        with db.unit_of_work() as uow:
            uow.conn.exec_driver_sql("DELETE FROM messages WHERE id = ?", (last_message,))
            uow.commit()
    finally:
        db.dispose()
    before = contents(full_db)
    result = run("vacuum", "--db", full_db)
    assert result.exit_code == 0, result.output
    [line] = result.stdout.splitlines()
    assert line.startswith(f"vacuumed {full_db}: ")
    assert line.endswith(", pages of 4,096 -> 1,024 bytes")
    assert query(full_db, "PRAGMA page_size") == [(1024,)]
    assert query(full_db, "PRAGMA journal_mode") == [("wal",)]
    assert query(full_db, "PRAGMA integrity_check") == [("ok",)]
    assert stat.S_IMODE(os.stat(full_db).st_mode) == 0o600
    assert contents(full_db) == before
    assert names(full_db) == ["alice", "Bob", "carol", "dave"]
    assert next_ids(full_db) == (last_account + 1, last_message + 1)


def test_vacuum_to_a_chosen_page_size(full_db):
    result = run("vacuum", "--db", full_db, "--page-size", "4096")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(", pages of 1,024 -> 4,096 bytes\n")
    assert query(full_db, "PRAGMA page_size") == [(4096,)]
    assert names(full_db) == ["alice", "Bob", "carol"]
    result = run("vacuum", "--db", full_db, "--page-size", "1000")
    assert result.exit_code == 2 and "'1000' is not one of" in result.stderr
    with pytest.raises(lib.AdminError, match="a page size is a power of two"):
        lib.vacuum(full_db, 1000)


def test_vacuum_refuses_while_the_database_is_open(full_db):
    with_4_kib_pages(full_db)
    before = contents(full_db)
    with held_open(full_db):
        one_line_error(run("vacuum", "--db", full_db), in_use(full_db))
    assert query(full_db, "PRAGMA page_size") == [(4096,)]
    assert contents(full_db) == before


def test_vacuum_refuses_what_it_cannot_rebuild(tmp_path):
    one_line_error(run("vacuum", "--db", "postgresql://chat@localhost/chat"),
                   "vacuum rebuilds SQLite files; PostgreSQL has VACUUM FULL")
    one_line_error(run("vacuum", "--db", str(tmp_path / "missing.db")),
                   f"no database at {tmp_path / 'missing.db'}")
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    result = run("vacuum", "--db", str(other))
    assert result.exit_code == 1 and "not a chat database" in result.stderr
    assert query(str(other), "PRAGMA journal_mode") == [("delete",)]  # untouched


def test_backup_shows_progress_on_a_terminal(full_db, tmp_path, monkeypatch):
    monkeypatch.setattr(admin_cli, "_stderr_is_tty", lambda: True)
    result = run("backup", str(tmp_path / "copy.db"), "--db", full_db)
    assert result.exit_code == 0
    assert f"backing up {full_db} to {tmp_path / 'copy.db'}" in result.stderr
    assert "backing up" in result.stderr.splitlines()[-1]  # click's bar (label only off a tty)
    assert result.stdout.startswith("backed up ")


# -- purge ------------------------------------------------------------------------------------


def test_purge_dry_run_changes_nothing(full_db):
    result = run("purge", "--older-than", "30", "--receipts-older-than", "7", "--dry-run",
                 "--db", full_db)
    assert result.exit_code == 0
    assert result.stdout == (
        f"would purge 2 undelivered messages (for 2 accounts) sent before {at(NOW - 30 * DAY)}\n"
        f"would purge 2 send receipts created before {at(NOW - 7 * DAY)}\n")
    assert json.loads(run("stats", "--db", full_db, "--json").stdout)["undelivered"] == 3


def test_purge_with_yes(full_db):
    result = run("purge", "--older-than", "30", "--db", full_db, "--yes", "--batch-size", "1")
    assert result.exit_code == 0
    assert result.stdout == f"purged 2 undelivered messages sent before {at(NOW - 30 * DAY)}\n"
    rows = json.loads(run("list-accounts", "--db", full_db, "--json").stdout)
    assert [(r["name"], r["undelivered"]) for r in rows] == [("alice", 1), ("Bob", 0), ("carol", 0)]


def test_purge_asks_first(full_db):
    result = run("purge", "--older-than", "30", "--receipts-older-than", "1", "--db", full_db,
                 input="y\n")
    assert result.exit_code == 0
    assert result.stdout == (
        f"Purge 2 undelivered messages (for 2 accounts) sent before {at(NOW - 30 * DAY)} and "
        f"2 send receipts created before {at(NOW - DAY)}? [y/N]: y\n"
        f"purged 2 undelivered messages sent before {at(NOW - 30 * DAY)}\n"
        f"purged 2 send receipts created before {at(NOW - DAY)}\n")
    refused = run("purge", "--older-than", "1", "--db", full_db, input="n\n")
    assert refused.exit_code == 1
    assert json.loads(run("stats", "--db", full_db, "--json").stdout)["undelivered"] == 1


def test_purge_nothing(full_db):
    result = run("purge", "--older-than", "100", "--db", full_db)
    assert (result.exit_code, result.stdout) == (0, "nothing to purge\n")


def test_purge_needs_a_policy(full_db):
    one_line_error(run("purge", "--db", full_db),
                   "nothing to purge: give --older-than and/or --receipts-older-than")
    assert run("purge", "--older-than", "0", "--db", full_db).exit_code == 2


# -- migrate and db-status --------------------------------------------------------------------


def test_migrate_creates_a_private_database(tmp_path):
    path = str(tmp_path / "new.db")
    result = run("migrate", "--db", path)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"created {path} at revision {HEAD}\n"
    assert result.stderr == ""
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert run("db-status", "--db", path).exit_code == 0


def test_migrate_at_head_does_nothing(empty_db):
    result = run("migrate", "--db", empty_db)
    assert (result.exit_code, result.stdout) == (
        0, f"{empty_db} is already at head revision {HEAD}; nothing to do\n")


def test_migrate_behind_backs_up_and_upgrades(tmp_path, monkeypatch):
    path = str(tmp_path / "old.db")
    db = Database(path)
    upgrade(db, "0001")
    db.dispose()
    os.chmod(path, 0o600)
    monkeypatch.setattr(admin_cli, "_stderr_is_tty", lambda: True)
    result = run("migrate", "--db", path)
    assert result.exit_code == 0, result.output
    quoted = re.escape(path)
    match = re.fullmatch(rf"backed up {quoted} to ({quoted}\.before-{HEAD}-\d{{8}}T\d{{6}})\n"
                         rf"upgraded {quoted} from 0001 to {HEAD}\n", result.stdout)
    assert match, result.stdout
    assert os.path.exists(match.group(1))
    assert "backing up to" in result.stderr and f"upgrading from 0001 to {HEAD}" in result.stderr
    db = Database(path)
    assert schema_status(db).state == "current"
    db.dispose()


def test_migrate_refuses_a_newer_database(empty_db):
    db = Database(empty_db)
    with db.write_engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    db.dispose()
    one_line_error(run("migrate", "--db", empty_db),
                   f"{empty_db} was written by a newer version of chat (revision 9999; "
                   f"this version ends at {HEAD}); not touching it")


def test_migrate_cannot_create_in_a_missing_directory(tmp_path):
    path = str(tmp_path / "no" / "chat.db")
    one_line_error(run("migrate", "--db", path),
                   f"cannot create {path}: No such file or directory")


def test_db_status_current(empty_db):
    result = run("db-status", "--db", empty_db)
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout == f"current revision:  {HEAD}\nhead revision:     {HEAD}\n"
    as_json = run("db-status", "--db", empty_db, "--json")
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout) == {"current": HEAD, "head": HEAD, "state": "current"}


def test_db_status_behind_exits_1(tmp_path):
    path = str(tmp_path / "old.db")
    db = Database(path)
    upgrade(db, "0001")
    db.dispose()
    os.chmod(path, 0o600)
    result = run("db-status", "--db", path)
    assert result.exit_code == 1
    assert result.stdout == f"current revision:  0001\nhead revision:     {HEAD}\n"
    assert result.stderr == f"Error: {path} is behind head; run: chat admin migrate --db {path}\n"
    as_json = run("db-status", "--db", path, "--json")
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout) == {"current": "0001", "head": HEAD, "state": "behind"}


def test_db_status_empty_and_newer(tmp_path, empty_db):
    blank = str(tmp_path / "blank.db")
    lib.create_private_file(blank)
    result = run("db-status", "--db", blank)
    assert result.exit_code == 1
    assert result.stdout == f"current revision:  none\nhead revision:     {HEAD}\n"
    assert result.stderr == (f"Error: {blank} has no chat schema yet; "
                             f"run: chat admin migrate --db {blank}\n")
    db = Database(empty_db)
    with db.write_engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    db.dispose()
    result = run("db-status", "--db", empty_db)
    assert result.exit_code == 1
    assert result.stderr == (f"Error: {empty_db} was written by a newer version of chat "
                             "(revision 9999); upgrade chat to use it\n")


def test_db_status_missing_file(tmp_path):
    one_line_error(run("db-status", "--db", str(tmp_path / "x.db")),
                   f"no database at {tmp_path / 'x.db'}")


# -- against a running server -----------------------------------------------------------------


def admin_proc(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    """``chat admin ...`` as its own process (as tests/conftest.py's chat_command runs it)."""
    return subprocess.run([sys.executable, "-m", "chatserver_cli", "admin", *args], input=input,
                          capture_output=True, text=True, timeout=60, check=False)


def test_admin_commands_while_the_server_serves_the_same_file(server_factory, tmp_path):
    path = tmp_path / "live.db"
    server = server_factory(db_path=path)
    clients = [server.client() for _ in range(3)]
    stop = threading.Event()
    errors: list[BaseException] = []
    try:
        for client, name in zip(clients, ("alice", "bob", "carol")):
            client.register(name, f"{name}-password")
        for i in range(20):
            clients[1].send("alice", f"hello {i}", client_msg_id=f"b{i}")

        def keep_sending():  # the server writes all through the admin commands below
            i = 0
            try:
                while not stop.is_set():
                    try:
                        clients[2].send("bob", f"busy {i}")
                    except ServerError as exc:
                        if exc.code != "rate_limited":
                            raise
                        stop.wait(max(exc.retry_after_ms, 10) / 1000)
                    i += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        sender = threading.Thread(target=keep_sending, daemon=True)
        sender.start()
        db = str(path)
        runs = {
            "list": admin_proc("list-accounts", "--db", db, "--json"),
            "csv": admin_proc("list-accounts", "--db", db, "--csv", "--limit", "2"),
            "show": admin_proc("show-account", "alice", "--db", db, "--json"),
            "stats": admin_proc("stats", "--db", db, "--json"),
            "status": admin_proc("db-status", "--db", db),
            "migrate": admin_proc("migrate", "--db", db),
            "backup": admin_proc("backup", str(tmp_path / "copy.db"), "--db", db),
            "dry": admin_proc("purge", "--older-than", "1", "--receipts-older-than", "1",
                              "--dry-run", "--db", db),
            "purge": admin_proc("purge", "--older-than", "1", "--receipts-older-than", "1",
                                "--yes", "--db", db),
            "reset": admin_proc("reset-password", "alice", "--password-stdin", "--db", db,
                                *CHEAP_HASH, input="alice-new-password\n"),
            "delete": admin_proc("delete-account", "alice", "--yes", "--db", db),
        }
        stop.set()
        sender.join(30)
    finally:
        stop.set()
        for client in clients:
            client.close()
    for name, done in runs.items():
        assert done.returncode == 0, (name, done.stderr)
        assert "database is locked" not in done.stderr + done.stdout, name
        assert "Traceback" not in done.stderr, name
    assert not errors, errors
    assert [r["name"] for r in json.loads(runs["list"].stdout)] == ["alice", "bob", "carol"]
    assert json.loads(runs["show"].stdout)["undelivered"] == 20
    assert json.loads(runs["stats"].stdout)["accounts"] == 3
    assert runs["delete"].stdout == "deleted account alice; discarded 20 undelivered messages\n"
    assert "database is locked" not in server.log
    assert json.loads(admin_proc("stats", "--db", str(tmp_path / "copy.db"), "--json").stdout)[
        "accounts"] == 3
    with server.client() as again:
        with pytest.raises(Exception, match="invalid_credentials"):
            again.login("alice", "alice-new-password")  # deleted, through the same file
        again.login("bob", "bob-password")


def test_restore_refuses_while_chat_serve_runs(server_factory, tmp_path):
    path = tmp_path / "served.db"
    server = server_factory(db_path=path)
    with server.client() as alice:
        alice.register("alice", "alice-password")
    backup = str(tmp_path / "backup.db")
    assert admin_proc("backup", backup, "--db", str(path)).returncode == 0
    refused = admin_proc("restore", backup, "--db", str(path), "--yes")
    assert refused.returncode == 1
    assert refused.stderr == (f"Error: {path} is in use (is chat serve running on it?); "
                              "stop the server first\n")
    with server.client() as alice:  # the server goes on, on its own database
        alice.login("alice", "alice-password")
    assert not [f for f in os.listdir(tmp_path) if "before-restore" in f or "restoring" in f]
