"""``chat admin list-accounts`` on databases written through the library, and its refusals."""

from __future__ import annotations

import json
import re
import shlex
import sqlite3
import time
from pathlib import Path

import pytest
from chatserver_cli.main import cli
from click.testing import CliRunner
from sqlalchemy import text

from chatserver.domain import SearchPattern
from chatserver.storage.database import Database
from chatserver.storage.migrate import ensure_schema, head_revision, upgrade

HASH = "$argon2id$not-a-real-hash"  # list-accounts never looks at it

# name: (created_at ms, last_login_at ms or None)
ACCOUNTS = {
    "Albert": (1_700_000_000_999, None),
    "alice": (1_704_067_200_000, 1_718_454_645_123),
    "bob": (946_684_799_999, 1_735_689_599_500),
    "carol_has_a_long_name": (86_400_000, 86_400_000),
}
# (sender, recipient, count)
MESSAGES = [("bob", "alice", 2), ("alice", "bob", 1), ("Albert", "carol_has_a_long_name", 12)]

TABLE = """\
NAME                   CREATED               LAST LOGIN            UNDELIVERED
Albert                 2023-11-14 22:13:20Z  never                           0
alice                  2024-01-01 00:00:00Z  2024-06-15 12:30:45Z            2
bob                    1999-12-31 23:59:59Z  2024-12-31 23:59:59Z            1
carol_has_a_long_name  1970-01-02 00:00:00Z  1970-01-02 00:00:00Z           12
"""

JSON_ROWS = [
    {"name": "Albert", "created": "2023-11-14T22:13:20Z", "last_login": None, "undelivered": 0},
    {"name": "alice", "created": "2024-01-01T00:00:00Z", "last_login": "2024-06-15T12:30:45Z",
     "undelivered": 2},
    {"name": "bob", "created": "1999-12-31T23:59:59Z", "last_login": "2024-12-31T23:59:59Z",
     "undelivered": 1},
    {"name": "carol_has_a_long_name", "created": "1970-01-02T00:00:00Z",
     "last_login": "1970-01-02T00:00:00Z", "undelivered": 12},
]


def populate(path: Path) -> Path:
    """A chat database at head with ACCOUNTS and MESSAGES, written through the library."""
    db = Database(str(path))
    try:
        ensure_schema(db)
        with db.unit_of_work() as uow:
            made = {}
            for name, (created, last_login) in ACCOUNTS.items():
                account = uow.repo.add_account(name, name.casefold(), HASH, created)
                uow.repo.record_login(account.id, last_login)
                made[name] = account
            for sender, recipient, count in MESSAGES:
                for i in range(count):
                    uow.repo.add_message(made[sender], made[recipient].id, f"message {i}",
                                         1_750_000_000_000 + i)
            uow.commit()
    finally:
        db.dispose()
    path.chmod(0o600)  # as a chat database should be (a world-readable one gets a warning)
    return path


@pytest.fixture
def chat_db(tmp_path) -> Path:
    return populate(tmp_path / "chat.db")


def run(*args: str):
    return CliRunner().invoke(cli, ["admin", "list-accounts", *args])


def assert_refused(result, message: str) -> None:
    """Exit 1, nothing on stdout, exactly ``Error: message`` on stderr, no traceback."""
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", f"Error: {message}\n")
    assert isinstance(result.exception, SystemExit)


# -- output -----------------------------------------------------------------------------------

def test_table(chat_db):
    result = run("--db", str(chat_db))
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout == TABLE


def test_table_pattern(chat_db):
    result = run("a*", "--db", str(chat_db))
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [  # the columns shrink to what is shown
        "NAME    CREATED               LAST LOGIN            UNDELIVERED",
        "Albert  2023-11-14 22:13:20Z  never                           0",
        "alice   2024-01-01 00:00:00Z  2024-06-15 12:30:45Z            2",
    ]


@pytest.mark.parametrize("pattern,names", [
    ("A*", ["Albert", "alice"]),  # without regard to case
    ("?ob", ["bob"]),
    ("*name", ["carol_has_a_long_name"]),
    ("carol_*", ["carol_has_a_long_name"]),  # '_' is literal, not a LIKE wildcard
    ("al_ce", []),
    ("bob", ["bob"]),
])
def test_json_pattern(chat_db, pattern, names):
    result = run(pattern, "--db", str(chat_db), "--json")
    assert (result.exit_code, result.stderr) == (0, "")
    assert json.loads(result.stdout) == [row for row in JSON_ROWS if row["name"] in names]


def test_json(chat_db):
    result = run("--db", str(chat_db), "--json")
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout.count("\n") == 1  # one JSON array on one line
    assert json.loads(result.stdout) == JSON_ROWS


def test_no_match(chat_db):
    result = run("zed*", "--db", str(chat_db))
    assert (result.exit_code, result.stdout, result.stderr) == (
        0, "NAME  CREATED  LAST LOGIN  UNDELIVERED\n", "")
    result = run("zed*", "--db", str(chat_db), "--json")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "[]\n", "")


def test_empty_chat_database(tmp_path):
    path = tmp_path / "new.db"
    db = Database(str(path))
    ensure_schema(db)
    db.dispose()
    path.chmod(0o600)
    result = run("--db", str(path), "--json")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "[]\n", "")


def test_db_from_environment(chat_db):
    result = CliRunner().invoke(cli, ["admin", "list-accounts", "--json"],
                                env={"CHAT_ADMIN_LIST_ACCOUNTS_DB": str(chat_db)})
    assert (result.exit_code, result.stderr) == (0, "")
    assert json.loads(result.stdout) == JSON_ROWS


def test_pattern_too_long(chat_db):
    result = run("x" * 65, "--db", str(chat_db))
    assert_refused(result, "patterns are at most 64 characters")


# -- refusals -----------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "missing.db"
    assert_refused(run("--db", str(path)), f"no database at {path}")
    assert not path.exists()  # not created as a side effect


def test_foreign_sqlite_file(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE recipes (name TEXT)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    assert_refused(run("--db", str(path)), f"{path} is not a chat database")
    assert path.read_bytes() == before


def test_empty_file(tmp_path):
    path = tmp_path / "empty.db"
    path.touch()
    assert_refused(run("--db", str(path)), f"{path} is not a chat database")
    assert path.read_bytes() == b""


def test_file_that_is_not_sqlite(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are not the tables you are looking for\n" * 100)
    result = run("--db", str(path))
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr.startswith(f"Error: {path} is not a chat database")
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n")
    assert "Traceback" not in result.stderr


def test_newer_revision(chat_db):
    db = Database(str(chat_db))
    with db.unit_of_work() as uow:
        uow.conn.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
        uow.commit()
    db.dispose()
    before = chat_db.read_bytes()
    assert_refused(run("--db", str(chat_db)),
                   f"{chat_db} was written by a newer version of chat (revision ffff); "
                   "upgrade chat to use it")
    assert chat_db.read_bytes() == before


def test_behind_head(tmp_path):
    path = tmp_path / "old.db"
    db = Database(str(path))
    upgrade(db, "0001")
    db.dispose()
    result = run("--db", str(path))
    assert_refused(result, f"{path} is at revision 0001, behind {head_revision()}; "
                           f"run: chat admin migrate --db {path}")
    assert "chat admin migrate" in result.stderr
    # untouched: still at 0001
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0001",)]
    finally:
        conn.close()


def test_the_command_named_for_a_database_behind_head_works(tmp_path):
    """The refusal above tells the user what to run; running it makes list-accounts work."""
    path = tmp_path / "old.db"
    db = Database(str(path))
    upgrade(db, "0001")
    db.dispose()
    path.chmod(0o600)
    advice = re.search(r"run: chat (.*)$", run("--db", str(path)).stderr).group(1)
    result = CliRunner().invoke(cli, shlex.split(advice))
    assert result.exit_code == 0, result.output
    result = run("--db", str(path), "--json")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "[]\n", "")


def test_world_readable_database_gets_a_warning(chat_db):
    chat_db.chmod(0o644)
    result = run("--db", str(chat_db))
    assert (result.exit_code, result.stdout) == (0, TABLE)
    assert result.stderr == (
        f"Warning: {chat_db} is readable by every user of this machine (mode 0644); "
        f"a chat database holds password hashes: chmod 600 {chat_db}\n")


# -- next to a running server ---------------------------------------------------------------------

def test_while_the_server_runs(tmp_path, server_factory):
    path = tmp_path / "live.db"
    server = server_factory(db_path=path)
    path.chmod(0o600)  # (whether serve creates it private is checked in test_serve.py)
    with server.client() as chat:
        chat.register("dora", "dora-password")
    with server.client() as chat:
        chat.register("eve", "eve-password")
        chat.send("dora", "hi dora")
        chat.send("dora", "still there?")
        # The server is running (and eve is connected) while the admin command reads the file.
        db = Database(str(path))
        try:
            stored = {a.name: a for a, _ in
                      db.read(lambda repo: repo.account_summaries(SearchPattern.parse("")))}
        finally:
            db.dispose()

        def when(ms):
            return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + "Z"

        result = run("--db", str(path))
        assert (result.exit_code, result.stderr) == (0, "")
        assert result.stdout.splitlines() == [
            "NAME  CREATED               LAST LOGIN            UNDELIVERED",
            f"dora  {when(stored['dora'].created_at)}  {when(stored['dora'].last_login_at)}"
            "            2",
            f"eve   {when(stored['eve'].created_at)}  {when(stored['eve'].last_login_at)}"
            "            0",
        ]
        result = run("d*", "--db", str(path), "--json")
        assert (result.exit_code, result.stderr) == (0, "")
        assert [row["name"] for row in json.loads(result.stdout)] == ["dora"]
    assert server.proc.poll() is None
    assert server.stop() == 0


@pytest.mark.parametrize("command", [["list-accounts"], ["db-status"], ["migrate"]])
def test_a_password_in_the_db_url_is_never_printed(command):
    """Errors name the database with its URL's password masked (it would land in logs)."""
    for url in ("nosuchdriver://chat:s3cret-pw@db.example/chat",
                "postgresql://chat:s3cret-pw@127.0.0.1:1/chat"):
        result = CliRunner().invoke(cli, ["admin", *command, "--db", url])
        assert result.exit_code != 0
        assert "s3cret-pw" not in result.output
        assert "***" in result.output
