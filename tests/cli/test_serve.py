"""``chat serve``: one clear line and exit 1 when it cannot start, the environment, signals."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
from pathlib import Path

import click
import pytest
from chatserver_cli.main import cli
from chatserver_cli.serve import serve
from click.testing import CliRunner
from tests.conftest import FAST_HASH_ARGS, chat_command  # tests/conftest.py
from sqlalchemy import text

from chatserver.client import ChatClient
from chatserver.storage.database import Database
from chatserver.storage.migrate import ensure_schema, head_revision, upgrade

# What logging.basicConfig in serve.py writes: "2026-01-01 12:00:00,123 INFO name: text".
LOG_RECORD = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def run_serve(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """``chat serve`` expected to give up at once (each test makes sure it cannot start)."""
    return subprocess.run(chat_command("serve", *FAST_HASH_ARGS, *args), capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, **kwargs)


def assert_refused(result: subprocess.CompletedProcess, message: str) -> None:
    """Exit 1, nothing on stdout, and besides log records exactly ``Error: message``."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    others = [line for line in result.stderr.splitlines() if not LOG_RECORD.match(line)]
    assert others == [f"Error: {message}"], result.stderr


def make_db(path: Path, revision: str = "head") -> Path:
    db = Database(str(path))
    try:
        if revision == "head":
            ensure_schema(db)
        else:
            upgrade(db, revision)
    finally:
        db.dispose()
    return path


# -- cannot start ---------------------------------------------------------------------------------

def test_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve("--db", str(tmp_path / "chat.db"), "--port", str(port))
    assert_refused(result, f"cannot listen on 127.0.0.1:{port}: Address already in use")


def test_port_of_a_running_chat_server(tmp_path, server):
    result = run_serve("--db", str(tmp_path / "second.db"), "--port", str(server.port))
    assert_refused(result, f"cannot listen on 127.0.0.1:{server.port}: Address already in use")
    assert server.proc.poll() is None  # the first one is unharmed
    with server.client() as chat:
        chat.register("alice", "alice-password")


def test_metrics_port_in_use_names_that_port(tmp_path):
    """Before, any OSError at start-up was reported as the chat port being unavailable."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve("--db", str(tmp_path / "chat.db"), "--port", "0",
                           "--metrics-port", str(port))
    assert_refused(result, f"cannot listen on 127.0.0.1:{port} (metrics): Address already in use")


def test_database_in_a_missing_directory(tmp_path):
    path = tmp_path / "no such dir" / "chat.db"
    result = run_serve("--db", str(path), "--port", "0")
    assert_refused(result, f"cannot start: [Errno 2] No such file or directory: '{path}'")


# SQLite's "unix-none" VFS has no locks and no shared memory, as some network file systems:
# SQLite then keeps the rollback journal when asked for WAL.
NO_WAL_URL = "sqlite:///file:chat.db?vfs=unix-none&uri=true"
NO_WAL_MESSAGE = ("SQLite cannot use WAL mode for file:chat.db (it stays in 'delete' mode): WAL "
                  "needs shared memory and file locks, which this file system or VFS does not "
                  "give; put the database on a local disk")


def test_a_database_that_cannot_use_wal_is_refused(tmp_path):
    result = run_serve("--db", NO_WAL_URL, "--port", "0", cwd=tmp_path)
    assert_refused(result, NO_WAL_MESSAGE)
    conn = sqlite3.connect(tmp_path / "chat.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    finally:
        conn.close()


def test_admin_refuses_a_database_that_cannot_use_wal(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["admin", "migrate", "--db", NO_WAL_URL])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == f"Error: {NO_WAL_MESSAGE}"


def test_foreign_sqlite_file(tmp_path):
    path = tmp_path / "recipes.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE recipes (name TEXT)")
    conn.execute("INSERT INTO recipes VALUES ('soup')")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    result = run_serve("--db", str(path), "--port", "0")
    assert_refused(result, f"{path} is not a chat database (it has other tables); not touching it")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipes.db"]


def test_file_that_is_not_sqlite(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("dear diary\n" * 200)
    before = path.read_bytes()
    result = run_serve("--db", str(path), "--port", "0")
    assert_refused(result, f"{path} is not a chat database (file is not a database)")
    assert path.read_bytes() == before


def test_database_from_a_newer_version(tmp_path):
    path = make_db(tmp_path / "chat.db")
    db = Database(str(path))
    with db.unit_of_work() as uow:
        uow.conn.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
        uow.commit()
    db.dispose()
    before = path.read_bytes()
    result = run_serve("--db", str(path), "--port", "0")
    assert_refused(result, f"{path} is at revision ffff, which this version does not know (it "
                           f"was written by a newer version of chat; this one ends at "
                           f"{head_revision()}); not touching it")
    assert path.read_bytes() == before


def test_database_behind_with_no_migrate(tmp_path):
    path = make_db(tmp_path / "chat.db", "0001")
    result = run_serve("--db", str(path), "--port", "0", "--no-migrate")
    assert_refused(result, f"{path} is at revision 0001, behind {head_revision()}; "
                           f"run: chat admin migrate --db {path}")


def test_database_behind_is_backed_up_and_upgraded(tmp_path, server_factory):
    path = make_db(tmp_path / "chat.db", "0001")
    server = server_factory(db_path=path)
    with server.client() as chat:
        chat.register("alice", "alice-password")
    assert server.stop() == 0
    backups = [p.name for p in tmp_path.iterdir() if p.name.startswith("chat.db.before-")]
    assert len(backups) == 1, backups
    assert re.fullmatch(rf"chat\.db\.before-{head_revision()}-\d{{8}}T\d{{6}}", backups[0])


@pytest.mark.parametrize("env,message", [
    ({"CHAT_SERVE_PORT": "65536"}, "Invalid value for '--port'"),
    ({"CHAT_SERVE_SYNC": "sometimes"}, "Invalid value for '--sync'"),
    ({"CHAT_SERVE_MAX_CONNECTIONS": "0"}, "Invalid value for '--max-connections'"),
])
def test_bad_option_from_the_environment(env, message):
    result = CliRunner().invoke(cli, ["serve"], env=env)  # refused while parsing: nothing runs
    assert result.exit_code == 2
    assert result.stdout == ""
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# -- the environment -----------------------------------------------------------------------------

def test_help_names_the_environment_variables():
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0
    # Unwrap the help so that a name split over lines is still found.
    flat = " ".join(result.stdout.split())
    for param in serve.params:
        if isinstance(param, click.Option) and param.name != "help":
            assert f"CHAT_SERVE_{param.name.upper()}" in flat, param.name
    assert "CHAT_SERVE_DB" in flat and "CHAT_SERVE_PORT=0" in flat


def test_environment_variables_are_honoured(tmp_path):
    path = tmp_path / "from-env.db"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CHAT_SERVE_PORT": "0",
           "CHAT_SERVE_DB": str(path), "CHAT_SERVE_ARGON2_TIME_COST": "1",
           "CHAT_SERVE_ARGON2_MEMORY_KIB": "64", "CHAT_SERVE_LOG_LEVEL": "warning"}
    # cwd is a fresh directory: had CHAT_SERVE_DB been ignored, chat.db would appear there.
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    proc = subprocess.Popen(chat_command("serve"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, env=env, cwd=workdir)
    try:
        line = proc.stdout.readline()
        match = re.fullmatch(r"chat server listening on 127\.0\.0\.1:(\d+) \(database (.+)\)\n",
                             line)
        assert match, line
        port, shown_db = int(match.group(1)), match.group(2)
        assert port != 2023 and port > 0
        assert shown_db == str(path)
        with ChatClient("127.0.0.1", port) as chat:
            chat.register("alice", "alice-password")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "Traceback" not in stderr
    assert not any(" INFO " in line for line in stderr.splitlines()), stderr  # warning level
    assert path.exists() and list(workdir.iterdir()) == []
    db = Database(str(path))
    try:
        assert db.read(lambda repo: repo.account_id_by_key("alice")) is not None
    finally:
        db.dispose()


# -- stopping -------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly(server, sig):
    chat = server.client()
    try:
        chat.register("alice", "alice-password")
        assert server.stop(sig) == 0
        notice = chat.pushes.get(timeout=60)
        assert (notice.code, notice.text) == ("shutting_down", "the server is stopping")
    finally:
        chat.close()
    assert "Traceback" not in server.log
    assert "stopped" in server.log
    # What was committed survives the stop.
    db = Database(str(server.db_path))
    try:
        assert db.read(lambda repo: repo.account_id_by_key("alice")) is not None
    finally:
        db.dispose()


# -- the database file it creates -----------------------------------------------------------------

def test_new_database_is_private_to_its_owner(tmp_path, server_factory):
    """A chat database holds password hashes (``chat admin`` warns when others can read one)."""
    server = server_factory(db_path=tmp_path / "new.db")
    with server.client() as chat:
        chat.register("alice", "alice-password")
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()
             if p.name.startswith("new.db")}
    assert "new.db" in modes
    assert all(int(mode, 8) & 0o077 == 0 for mode in modes.values()), modes
