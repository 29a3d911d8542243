"""``--sync full|normal``: the SQLite synchronous level of every connection the server opens.

full (the default) survives a process crash and a power loss; normal survives a process
crash (a power loss may undo the last commits). Power loss cannot be simulated here; what can
be checked is that the setting reaches SQLite, that the default is full, and that normal does
survive SIGKILL. (tests/e2e/test_persistence.py does the SIGKILL check for the default.)
"""

from __future__ import annotations

import click
import pytest
from sqlalchemy import text

from chatserver.app import ChatApp
from chatserver.server import ServerConfig
from chatserver.storage.database import Database
from chatserver_cli.serve import serve

from .helpers import CHEAP, PASSWORD, fetch_everything, integrity_check

PRAGMA_VALUE = {"full": 2, "normal": 1}  # what PRAGMA synchronous reports


def test_serve_defaults_to_full():
    [option] = [p for p in serve.params if p.name == "sync"]
    assert option.default == "full"
    assert isinstance(option.type, click.Choice) and list(option.type.choices) == ["full", "normal"]


@pytest.mark.parametrize("sync", ["full", "normal"])
def test_every_connection_of_the_server_uses_the_level(tmp_path, sync):
    app = ChatApp(str(tmp_path / "s.db"), ServerConfig(port=0), sync=sync, hash_params=CHEAP)
    app.start()
    try:
        for engine in (app.db.write_engine, app.db.read_engine):
            with engine.connect() as conn:
                conn.execute(text("SELECT count(*) FROM accounts"))  # reads the file's header
                assert conn.execute(text("PRAGMA synchronous")).scalar() == PRAGMA_VALUE[sync]
                assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        # and the writer thread's own connection, which does the commits
        level = app.writer.run(lambda repo: repo.conn.execute(text("PRAGMA synchronous")).scalar())
        assert level == PRAGMA_VALUE[sync]
    finally:
        app.stop()


def test_default_database_level_is_full(tmp_path):
    db = Database(str(tmp_path / "d.db"))
    try:
        with db.write_engine.connect() as conn:
            assert conn.execute(text("PRAGMA synchronous")).scalar() == PRAGMA_VALUE["full"]
    finally:
        db.dispose()


def test_sync_normal_survives_a_process_crash(start_server, tmp_path):
    db = tmp_path / "normal.db"
    server = start_server("--sync", "normal", "--send-rate", "0", db=db)
    with server.client() as alice, server.client() as bob:
        alice.register("alice", PASSWORD)
        bob.register("bob", PASSWORD)
        bob.logout()
        ids = [alice.send("bob", f"n{i}", client_msg_id=f"n{i}").message_id for i in range(300)]
        assert server.kill() == -9  # right after the last Sent
    assert integrity_check(db) == "ok"
    again = start_server("--sync", "normal", db=db)
    with again.client() as bob:
        assert bob.login("bob", PASSWORD).pending == 300
        assert [m.id for m in fetch_everything(bob, ack=False)] == ids
