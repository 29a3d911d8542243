"""Migrations: the four standard checks, the 0001 -> 0002 data migration, the start-up policy.

Every database is a real SQLite file in tmp_path. Revisions are applied with the package's own
``upgrade()`` (the server's path) or with ``alembic.command`` on a URL (the developer's path,
through migrations/env.py), never with ``metadata.create_all``.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

from chatserver.app import ChatApp
from chatserver.errors import InvalidCredentials
from chatserver.passwords import HashParameters, PasswordHasher
from chatserver.server import ServerConfig
from chatserver.service import ChatService
from chatserver.storage.database import Database, database_url
from chatserver.storage.migrate import (
    SchemaError,
    alembic_config,
    ensure_schema,
    head_revision,
    schema_status,
    upgrade,
)
from chatserver.storage.tables import Base
from chatserver.storage.writer import GroupCommitWriter
from tests.sqlite_files import query, with_pages_of

REPO_ROOT = Path(__file__).resolve().parents[2]
HEAD = "0004"
FAST_HASH = HashParameters(time_cost=1, memory_kib=64, parallelism=1)


# -- helpers --------------------------------------------------------------------------------

def revision_of(path: Path) -> str | None:
    conn = sqlite3.connect(path)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "alembic_version" not in tables:
            return None
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        return row[0] if row else None
    finally:
        conn.close()


def columns(path: Path, table: str) -> list[str]:
    return [r[1] for r in query(path, f"PRAGMA table_info({table})")]


def build(path: Path, revision: str = "head") -> Path:
    """A database file brought to ``revision`` by the package's own upgrade()."""
    db = Database(str(path))
    try:
        upgrade(db, revision)
    finally:
        db.dispose()
    return path


def url_config(path: Path) -> Config:
    """The developer's path: alembic commands on a URL, run by migrations/env.py."""
    config = alembic_config()
    config.set_main_option("sqlalchemy.url", str(path))
    return config


def model_diffs(path: Path) -> list:
    engine = create_engine(database_url(str(path)))
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def schema(path: Path) -> dict:
    """Everything about the schema that matters, comparable between two files."""
    engine = create_engine(database_url(str(path)))
    try:
        insp = inspect(engine)
        sql = dict(query(path, "SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
        result = {}
        for table in sorted(insp.get_table_names()):
            if table in ("sqlite_sequence", "alembic_version"):
                continue
            result[table] = {
                "columns": [(c["name"], str(c["type"]), c["nullable"], c.get("default"))
                            for c in insp.get_columns(table)],
                "pk": insp.get_pk_constraint(table)["constrained_columns"],
                "fks": sorted(
                    (fk["name"], tuple(fk["constrained_columns"]), fk["referred_table"],
                     tuple(fk["referred_columns"]), fk.get("options", {}).get("ondelete"))
                    for fk in insp.get_foreign_keys(table)),
                "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                                  for i in insp.get_indexes(table)),
                "uniques": sorted((u["name"], tuple(u["column_names"]))
                                  for u in insp.get_unique_constraints(table)),
                # Ids are never reused only while the table says AUTOINCREMENT.
                "autoincrement": "AUTOINCREMENT" in sql[table].upper(),
                "without_rowid": "WITHOUT ROWID" in sql[table].upper(),
            }
        return result
    finally:
        engine.dispose()


def backups_of(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".before-*"))


def file_state(path: Path) -> tuple[bytes, list[str]]:
    """The file's bytes and the names of its companions (-wal, -shm, backups)."""
    return path.read_bytes(), sorted(p.name for p in path.parent.iterdir())


# -- the four standard checks ---------------------------------------------------------------

def test_single_head():
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    assert heads == [HEAD]
    assert head_revision() == HEAD
    # The checkout's alembic.ini points at the same scripts as the installed package.
    ini = Config(str(REPO_ROOT / "alembic.ini"))
    assert ScriptDirectory.from_config(ini).get_heads() == heads


def test_revisions_form_one_line_from_base():
    script = ScriptDirectory.from_config(alembic_config())
    chain = [r.revision for r in reversed(list(script.walk_revisions()))]
    assert chain == ["0001", "0002", "0003", "0004"]
    for rev in script.walk_revisions():
        assert rev.module.__doc__, f"revision {rev.revision} has no docstring"


def test_upgrade_empty_to_head(tmp_path):
    path = build(tmp_path / "chat.db")
    assert revision_of(path) == HEAD
    assert {"accounts", "messages", "send_receipts"} <= set(schema(path))
    assert query(path, "PRAGMA foreign_key_check") == []
    assert query(path, "PRAGMA integrity_check") == [("ok",)]


def test_models_match_migrations(tmp_path):
    path = build(tmp_path / "chat.db")
    assert model_diffs(path) == []
    # and the same through `alembic check`, on the app's own connection
    db = Database(str(path))
    try:
        config = alembic_config()
        with db.write_engine.connect() as conn:
            config.attributes["connection"] = conn
            command.check(config)  # raises AutogenerateDiffsDetected on any difference
    finally:
        db.dispose()


def test_every_schema_property_the_code_relies_on(tmp_path):
    path = build(tmp_path / "chat.db")
    s = schema(path)
    assert s["accounts"]["autoincrement"] and s["messages"]["autoincrement"]
    assert ("uq_accounts_name_key", ("name_key",)) in s["accounts"]["uniques"]
    assert ("ix_messages_recipient_id_id", ("recipient_id", "id"), False) in s["messages"]["indexes"]
    ondelete = {fk[1]: fk[4] for fk in s["messages"]["fks"]}
    # sender_id is a record, not a reference (0004): deleting a sender rewrites nothing.
    assert ondelete == {("recipient_id",): "CASCADE"}
    assert [i[0] for i in s["messages"]["indexes"]] == ["ix_messages_recipient_id_id"]
    # A receipt is one B-tree entry: its key (0004); purges walk that key.
    assert s["send_receipts"]["without_rowid"] and s["send_receipts"]["indexes"] == []
    assert s["send_receipts"]["pk"] == ["sender_id", "client_msg_id"]
    assert {fk[1]: fk[4] for fk in s["send_receipts"]["fks"]} == {("sender_id",): "CASCADE"}


def test_each_revision_up_down_up(tmp_path):
    """Walk base -> head; at each revision step down one and up again.

    After every step the schema must be exactly what a straight upgrade to that revision
    builds (a fresh file is the reference), not merely be at the right revision number.
    """
    script = ScriptDirectory.from_config(alembic_config())
    chain = [r.revision for r in reversed(list(script.walk_revisions()))]
    reference = {rev: schema(build(tmp_path / f"ref-{rev}.db", rev)) for rev in chain}
    reference["base"] = {}

    path = tmp_path / "walk.db"
    config = url_config(path)
    problems = []
    for rev in chain:
        down = script.get_revision(rev).down_revision or "base"
        command.upgrade(config, rev)
        assert revision_of(path) == rev
        command.downgrade(config, down)
        assert revision_of(path) == (None if down == "base" else down)
        if schema(path) != reference[down]:
            problems.append(f"down {rev} -> {down}: {_diff(schema(path), reference[down])}")
        command.upgrade(config, rev)
        assert revision_of(path) == rev
        if schema(path) != reference[rev]:
            problems.append(f"up again {down} -> {rev}: {_diff(schema(path), reference[rev])}")
    assert revision_of(path) == HEAD
    assert model_diffs(path) == []
    assert problems == []


def _diff(got: dict, want: dict) -> dict:
    out = {}
    for table in sorted(set(got) | set(want)):
        g, w = got.get(table), want.get(table)
        if g != w:
            out[table] = {k: (g.get(k) if g else None, w.get(k) if w else None)
                          for k in sorted(set(g or {}) | set(w or {}))
                          if (g or {}).get(k) != (w or {}).get(k)}
    return out


def test_account_ids_are_not_reused_after_a_downgrade_and_upgrade(tmp_path):
    """DESIGN.md: ids are never reused, even after the row with the highest id is deleted.
    A developer's `alembic downgrade 0001 && alembic upgrade head` must not change that."""
    path = build(tmp_path / "chat.db")
    config = url_config(path)
    command.downgrade(config, "0001")
    command.upgrade(config, "head")
    conn = sqlite3.connect(path)
    try:
        for name in ("a", "b", "c"):
            conn.execute("INSERT INTO accounts (name, name_key, password_hash, created_at) "
                         "VALUES (?, ?, 'h', 1)", (name, name))
        highest = conn.execute("SELECT MAX(id) FROM accounts").fetchone()[0]
        conn.execute("DELETE FROM accounts WHERE id = ?", (highest,))
        conn.execute("INSERT INTO accounts (name, name_key, password_hash, created_at) "
                     "VALUES ('d', 'd', 'h', 1)")
        new_id = conn.execute("SELECT id FROM accounts WHERE name = 'd'").fetchone()[0]
        conn.commit()
    finally:
        conn.close()
    assert new_id > highest


def test_downgrade_keeps_the_data(tmp_path):
    path = build(tmp_path / "chat.db")
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO accounts VALUES (1, 'Alice', 'alice', 'h1', 100, 500, 3)")
    conn.execute("INSERT INTO accounts VALUES (2, 'Bob', 'bob', 'h2', 200, NULL, 0)")
    conn.execute("INSERT INTO messages VALUES (7, 2, 1, 'Alice', 300, 'hello')")
    conn.commit()
    conn.close()
    config = url_config(path)
    command.downgrade(config, "0001")
    assert query(path, "SELECT * FROM accounts ORDER BY id") == [
        (1, "Alice", "alice", "h1", 100), (2, "Bob", "bob", "h2", 200)]
    assert query(path, "SELECT * FROM messages") == [(7, 2, 1, "Alice", 300, "hello")]
    command.upgrade(config, "head")
    assert query(path, "SELECT id, last_login_at, password_version FROM accounts ORDER BY id") == [
        (1, 100, 0), (2, 200, 0)]
    assert query(path, "SELECT * FROM messages") == [(7, 2, 1, "Alice", 300, "hello")]
    assert query(path, "PRAGMA foreign_key_check") == []


def test_alembic_command_line_from_the_checkout(tmp_path):
    path = tmp_path / "cli.db"
    alembic = [sys.executable, "-m", "alembic", "-x", f"db={path}"]
    up = subprocess.run([*alembic, "upgrade", "head"], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    assert revision_of(path) == HEAD
    assert model_diffs(path) == []
    check = subprocess.run([*alembic, "check"], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=120)
    assert check.returncode == 0, check.stderr
    assert "No new upgrade operations detected" in check.stdout + check.stderr
    # The database it made is one the server accepts as it is.
    db = Database(str(path))
    try:
        assert ensure_schema(db).state == "current"
    finally:
        db.dispose()


# -- data migrations 0001 -> head -------------------------------------------------------------

PEOPLE = {"Alice": "alice password", "bob": "bob's password", "Carol.X": "carol-password"}
BULK_ACCOUNTS = 1_500
BULK_MESSAGES = 15_000


@pytest.fixture(scope="module")
def hasher() -> PasswordHasher:
    return PasswordHasher(FAST_HASH)


@pytest.fixture
def old_db(tmp_path, hasher) -> Path:
    """A database at revision 0001 holding accounts with real hashes and undelivered messages,
    written by raw SQL as the 0001 code would have."""
    path = build(tmp_path / "chat.db", "0001")
    assert revision_of(path) == "0001"
    assert "last_login_at" not in columns(path, "accounts")
    conn = sqlite3.connect(path)
    accounts = []
    for i, (name, password) in enumerate(PEOPLE.items(), start=1):
        accounts.append((i, name, name.casefold(), hasher.hash(password), 1_600_000_000_000 + i))
    bulk_hash = accounts[0][3]
    for i in range(len(PEOPLE) + 1, len(PEOPLE) + 1 + BULK_ACCOUNTS):
        accounts.append((i, f"user{i}", f"user{i}", bulk_hash, 1_600_000_000_000 + i))
    conn.executemany("INSERT INTO accounts VALUES (?, ?, ?, ?, ?)", accounts)
    # Ids with gaps (acknowledged messages left holes), as a real database has.
    messages = [
        (10, 1, 2, "bob", 1_600_000_100_000, "first for alice"),
        (12, 1, 3, "Carol.X", 1_600_000_100_000, "second for alice ☺"),
        (15, 1, None, "Ghost", 1_600_000_200_000, "from a deleted account"),
        (20, 2, 1, "Alice", 1_600_000_300_000, "for bob"),
    ]
    rng = random.Random(2)
    for k in range(BULK_MESSAGES):
        recipient = rng.randrange(4, len(accounts) + 1)
        messages.append((100 + 2 * k, recipient, 1, "Alice", 1_600_000_400_000 + k, f"bulk {k}"))
    conn.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)", messages)
    conn.execute("INSERT INTO send_receipts VALUES (1, 'c-1', 20, 1600000300000)")
    conn.commit()
    conn.close()
    return path


def dump(path: Path, table: str, columns_: str = "*") -> list[tuple]:
    key = "sender_id, client_msg_id" if table == "send_receipts" else "id"  # no rowid there
    return query(path, f"SELECT {columns_} FROM {table} ORDER BY {key}")


def test_data_migration_keeps_every_row(old_db):
    old_accounts = dump(old_db, "accounts")
    old_messages = dump(old_db, "messages")
    old_receipts = dump(old_db, "send_receipts")
    assert len(old_accounts) == len(PEOPLE) + BULK_ACCOUNTS

    db = Database(str(old_db))
    try:
        status = ensure_schema(db)
    finally:
        db.dispose()

    assert (status.state, status.current, status.head) == ("behind", "0001", HEAD)
    assert revision_of(old_db) == HEAD
    assert dump(old_db, "accounts", "id, name, name_key, password_hash, created_at") == old_accounts
    assert dump(old_db, "accounts", "last_login_at") == [(a[4],) for a in old_accounts]
    assert dump(old_db, "accounts", "password_version") == [(0,)] * len(old_accounts)
    assert dump(old_db, "messages") == old_messages
    assert dump(old_db, "send_receipts") == old_receipts
    assert query(old_db, "PRAGMA foreign_key_check") == []
    assert query(old_db, "PRAGMA integrity_check") == [("ok",)]
    assert schema(old_db) == schema(build(old_db.parent / "fresh.db"))
    assert model_diffs(old_db) == []


def test_migrated_database_works_with_the_service(old_db, hasher):
    db = Database(str(old_db))
    ensure_schema(db)
    writer = GroupCommitWriter(db.write_engine)
    try:
        service = ChatService(db, writer, hasher, clock=lambda: 1_700_000_000_000)
        alice, pending = service.login("alice", PEOPLE["Alice"])
        assert (alice.id, alice.name, pending) == (1, "Alice", 3)
        assert alice.created_at == 1_600_000_000_001
        messages, remaining = service.fetch(alice, 0)
        assert remaining == 0
        assert [(m.id, m.sender, m.sent_at, m.body) for m in messages] == [
            (10, "bob", 1_600_000_100_000, "first for alice"),
            (12, "Carol.X", 1_600_000_100_000, "second for alice ☺"),
            (15, "Ghost", 1_600_000_200_000, "from a deleted account"),
        ]
        bob, pending = service.login("BOB", PEOPLE["bob"])
        assert pending == 1
        # The old receipt still makes Alice's retry a duplicate.
        retry = service.send(alice, "bob", "for bob", client_msg_id="c-1")
        assert (retry.duplicate, retry.message_id) == (True, 20)
        with pytest.raises(InvalidCredentials):
            service.login("Alice", "wrong password")
        # New rows get ids above every old one.
        dave = service.register("dave", "dave password")
        assert dave.id > len(PEOPLE) + BULK_ACCOUNTS
        sent = service.send(alice, "bob", "after the upgrade")
        assert sent.message_id > 100 + 2 * (BULK_MESSAGES - 1)  # the highest old id
        assert service.ack(alice, [m.id for m in messages]) == 3
        assert service.fetch(alice, 0) == ([], 0)
    finally:
        writer.close()
        db.dispose()


def test_upgrade_from_0002_keeps_every_row_and_starts_versions_at_0(tmp_path, hasher):
    """0002 -> 0003 adds ``password_version`` (0 for every account: no reset has happened)
    and loses nothing; a reset on the upgraded database then counts from there."""
    path = build(tmp_path / "at-0002.db", "0002")
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO accounts VALUES (1, 'Alice', 'alice', ?, 100, 500)",
                 (hasher.hash(PEOPLE["Alice"]),))
    conn.execute("INSERT INTO accounts VALUES (2, 'Bob', 'bob', 'h2', 200, NULL)")
    conn.execute("INSERT INTO messages VALUES (7, 2, 1, 'Alice', 300, 'hello')")
    conn.execute("INSERT INTO send_receipts VALUES (1, 'c-1', 7, 300)")
    conn.commit()
    conn.close()
    before = {t: dump(path, t) for t in ("accounts", "messages", "send_receipts")}

    db = Database(str(path))
    try:
        status = ensure_schema(db)
        assert (status.state, status.current, status.head) == ("behind", "0002", HEAD)
        cols = "id, name, name_key, password_hash, created_at, last_login_at"
        assert dump(path, "accounts", cols) == before["accounts"]
        assert dump(path, "accounts", "password_version") == [(0,), (0,)]
        assert dump(path, "messages") == before["messages"]
        assert dump(path, "send_receipts") == before["send_receipts"]
        assert model_diffs(path) == []
        with db.unit_of_work() as uow:
            uow.repo.reset_password_hash(1, hasher.hash("a new password"))
            uow.commit()
        assert db.read(lambda repo: repo.password_versions([1, 2, 3])) == {1: 1, 2: 0}
    finally:
        db.dispose()


def test_upgrade_from_0003_keeps_every_row_and_the_message_counter(tmp_path):
    """0003 -> 0004 rebuilds ``messages`` (no sender foreign key) and ``send_receipts``
    (WITHOUT ROWID) on SQLite: every row stays, and so does the AUTOINCREMENT counter, which
    is above the largest id left when the newest messages were acknowledged."""
    path = build(tmp_path / "at-0003.db", "0003")
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO accounts VALUES (1, 'Alice', 'alice', 'h1', 100, 500, 2)")
    conn.execute("INSERT INTO accounts VALUES (2, 'Bob', 'bob', 'h2', 200, NULL, 0)")
    conn.executemany("INSERT INTO messages VALUES (?, 2, ?, ?, ?, ?)", [
        (7, 1, "Alice", 300, "hello"),
        (8, None, "Carol", 310, "from a sender deleted before the upgrade"),
        (9, 1, "Alice", 320, "h\u00e9llo\x00 with a NUL"),
        (12, 1, "Alice", 330, "acknowledged below"),
    ])
    conn.execute("DELETE FROM messages WHERE id = 12")  # the counter stays at 12
    conn.executemany("INSERT INTO send_receipts VALUES (?, ?, ?, ?)", [
        (1, "c-2", 9, 320), (1, "c-1", 7, 300), (2, "c-1", 12, 330)])
    conn.commit()
    conn.close()
    before = {t: dump(path, t) for t in ("accounts", "messages", "send_receipts")}
    assert query(path, "SELECT seq FROM sqlite_sequence WHERE name = 'messages'") == [(12,)]

    db = Database(str(path))
    try:
        status = ensure_schema(db)
        assert (status.state, status.current, status.head) == ("behind", "0003", HEAD)
    finally:
        db.dispose()
    assert {t: dump(path, t) for t in before} == before
    assert query(path, "SELECT seq FROM sqlite_sequence WHERE name = 'messages'") == [(12,)]
    s = schema(path)
    assert s["send_receipts"]["without_rowid"] and s["messages"]["autoincrement"]
    assert model_diffs(path) == []
    assert query(path, "PRAGMA foreign_key_check") == []
    assert query(path, "PRAGMA integrity_check") == [("ok",)]
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO messages (recipient_id, sender_id, sender_name, sent_at, body) "
                 "VALUES (2, 1, 'Alice', 400, 'after')")
    new_id = conn.execute("SELECT MAX(id) FROM messages").fetchone()[0]
    conn.commit()
    conn.close()
    assert new_id == 13  # not 10: id 12 was used, and ids are never reused


def test_downgrade_from_0004_clears_the_ids_of_deleted_senders(tmp_path):
    """At 0004 a deleted sender's messages keep its id; the old foreign key (ON DELETE SET
    NULL) would have cleared it, so the downgrade does, and the data passes its check."""
    path = build(tmp_path / "chat.db")
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO accounts VALUES (1, 'Alice', 'alice', 'h1', 100, 500, 0)")
    conn.execute("INSERT INTO accounts VALUES (2, 'Bob', 'bob', 'h2', 200, NULL, 0)")
    conn.execute("INSERT INTO accounts VALUES (3, 'Carol', 'carol', 'h3', 200, NULL, 0)")
    conn.execute("INSERT INTO messages VALUES (7, 2, 1, 'Alice', 300, 'from alice')")
    conn.execute("INSERT INTO messages VALUES (8, 2, 3, 'Carol', 310, 'from carol')")
    conn.execute("INSERT INTO send_receipts VALUES (3, 'c-1', 8, 310)")
    conn.execute("DELETE FROM accounts WHERE id = 3")  # Carol's message keeps her id
    conn.execute("DELETE FROM send_receipts WHERE sender_id = 3")
    conn.commit()
    conn.close()
    assert dump(path, "messages", "id, sender_id") == [(7, 1), (8, 3)]
    command.downgrade(url_config(path), "0003")
    assert dump(path, "messages") == [(7, 2, 1, "Alice", 300, "from alice"),
                                      (8, 2, None, "Carol", 310, "from carol")]
    assert query(path, "PRAGMA foreign_key_check") == []
    assert not schema(path)["send_receipts"]["without_rowid"]


def test_failed_upgrade_leaves_the_database_at_its_revision(old_db):
    """Migrations run in one transaction: a foreign-key problem found at the end undoes all."""
    conn = sqlite3.connect(old_db)  # foreign keys are off on a plain connection
    conn.execute("INSERT INTO messages VALUES (99999999, 424242, NULL, 'x', 1, 'orphan')")
    conn.commit()
    conn.close()
    before = dump(old_db, "accounts")
    db = Database(str(old_db))
    try:
        with pytest.raises(SchemaError, match="foreign key"):
            ensure_schema(db)
    finally:
        db.dispose()
    assert revision_of(old_db) == "0001"
    assert "last_login_at" not in columns(old_db, "accounts")
    assert dump(old_db, "accounts") == before


# -- start-up policy ------------------------------------------------------------------------

def test_new_file_is_created_at_head(tmp_path):
    path = tmp_path / "new.db"
    db = Database(str(path))
    try:
        assert schema_status(db).state == "empty"
        status = ensure_schema(db)
        assert (status.state, status.current, status.head) == ("empty", None, HEAD)
        assert schema_status(db).state == "current"
    finally:
        db.dispose()
    assert revision_of(path) == HEAD
    assert query(path, "PRAGMA journal_mode") == [("wal",)]
    assert backups_of(path) == []  # nothing to back up
    assert model_diffs(path) == []


def test_zero_byte_file_is_created_at_head(tmp_path):
    path = tmp_path / "empty.db"
    path.write_bytes(b"")
    db = Database(str(path))
    try:
        assert ensure_schema(db).state == "empty"
    finally:
        db.dispose()
    assert revision_of(path) == HEAD


@pytest.mark.parametrize("start", ["absent", "zero bytes"])
def test_a_new_database_gets_1_kib_pages(tmp_path, start):
    """A file this package creates (``chat serve`` makes it zero bytes first, private) gets
    1 KiB pages: a send's commit changes four pages whatever their size (DESIGN.md)."""
    path = tmp_path / "new.db"
    if start == "zero bytes":
        path.write_bytes(b"")
    db = Database(str(path))
    try:
        ensure_schema(db)
    finally:
        db.dispose()
    assert query(path, "PRAGMA page_size") == [(1024,)]
    assert query(path, "PRAGMA journal_mode") == [("wal",)]
    assert revision_of(path) == HEAD


def test_an_existing_database_keeps_its_page_size(tmp_path):
    """A database made before 1 KiB pages (SQLite's 4 KiB) is upgraded and served as it is:
    the page size is fixed once a file has pages."""
    path = with_pages_of(tmp_path / "chat.db", 4096)
    build(path, "0001")
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO accounts VALUES (1, 'Alice', 'alice', 'h', 100)")
    conn.execute("INSERT INTO messages VALUES (7, 1, 1, 'Alice', 200, 'kept')")
    conn.commit()
    conn.close()
    db = Database(str(path))
    try:
        ensure_schema(db)
        writer = GroupCommitWriter(db.write_engine)
        try:
            writer.run(lambda repo: repo.add_account("Bob", "bob", "h", 300))
        finally:
            writer.close()
    finally:
        db.dispose()
    assert revision_of(path) == HEAD
    assert query(path, "PRAGMA page_size") == [(4096,)]
    assert query(path, "PRAGMA integrity_check") == [("ok",)]
    assert query(path, "SELECT id, body FROM messages") == [(7, "kept")]
    assert query(path, "SELECT name FROM accounts ORDER BY id") == [("Alice",), ("Bob",)]


@pytest.mark.parametrize(("pages", "hint"), [(None, False), (1024, False), (4096, True)])
def test_the_server_says_how_to_give_a_database_1_kib_pages(tmp_path, caplog, pages, hint):
    path = tmp_path / "chat.db"
    if pages:
        with_pages_of(path, pages)
    with caplog.at_level(logging.INFO, logger="chatserver"):
        app = ChatApp(str(path), ServerConfig(host="127.0.0.1", port=0))
        app.stop()
    said = [r.getMessage() for r in caplog.records if "chat admin vacuum" in r.getMessage()]
    hint_text = (f"{path} has pages of 4096 bytes (new databases get 1024, for faster "
                 "commits); with the server stopped, chat admin vacuum converts it")
    assert said == ([hint_text] if hint else [])


def test_database_at_head_is_left_alone(tmp_path):
    path = build(tmp_path / "chat.db")
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO accounts VALUES (1, 'Alice', 'alice', 'h', 100, 200, 0)")
    conn.commit()
    conn.close()
    before = file_state(path)
    db = Database(str(path))
    try:
        status = ensure_schema(db)
        assert (status.state, status.current) == ("current", HEAD)
        assert ensure_schema(db).state == "current"
    finally:
        db.dispose()
    assert file_state(path) == before
    assert backups_of(path) == []


def test_database_behind_is_backed_up_then_upgraded(old_db):
    old_accounts = dump(old_db, "accounts")
    db = Database(str(old_db))
    try:
        assert schema_status(db).state == "behind"
        ensure_schema(db)
        assert schema_status(db).state == "current"
    finally:
        db.dispose()
    assert revision_of(old_db) == HEAD
    backups = backups_of(old_db)
    assert len(backups) == 1
    assert backups[0].name.startswith(f"chat.db.before-{HEAD}-")
    # The backup is the old database, whole.
    assert revision_of(backups[0]) == "0001"
    assert dump(backups[0], "accounts") == old_accounts
    assert query(backups[0], "PRAGMA integrity_check") == [("ok",)]
    assert len(dump(backups[0], "messages")) == 4 + BULK_MESSAGES


def test_database_behind_without_permission_is_refused(old_db):
    before = file_state(old_db)
    db = Database(str(old_db))
    try:
        with pytest.raises(SchemaError) as err:
            ensure_schema(db, allow_upgrade=False)
    finally:
        db.dispose()
    message = str(err.value)
    assert "chat admin migrate" in message
    assert str(old_db) in message
    assert "0001" in message
    assert revision_of(old_db) == "0001"
    assert "last_login_at" not in columns(old_db, "accounts")
    assert file_state(old_db) == before
    assert backups_of(old_db) == []


def test_database_ahead_is_refused_and_untouched(tmp_path):
    path = build(tmp_path / "chat.db")
    conn = sqlite3.connect(path)
    conn.execute("UPDATE alembic_version SET version_num = 'ffff'")
    conn.commit()
    conn.close()
    before = file_state(path)
    db = Database(str(path))
    try:
        assert schema_status(db).state == "ahead"
        with pytest.raises(SchemaError, match="ffff"):
            ensure_schema(db)
        with pytest.raises(SchemaError, match="ffff"):
            ensure_schema(db, allow_upgrade=False)
    finally:
        db.dispose()
    assert file_state(path) == before
    assert revision_of(path) == "ffff"


def test_foreign_database_is_refused_and_untouched(tmp_path):
    path = tmp_path / "notes.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    conn.execute("INSERT INTO notes (text) VALUES ('keep me')")
    conn.commit()
    conn.close()
    before = file_state(path)
    db = Database(str(path))
    try:
        assert schema_status(db).state == "foreign"
        with pytest.raises(SchemaError, match="not a chat database"):
            ensure_schema(db)
    finally:
        db.dispose()
    assert file_state(path) == before
    assert revision_of(path) is None
    assert query(path, "SELECT text FROM notes") == [("keep me",)]


def test_other_applications_alembic_database_is_refused_and_untouched(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
    conn.execute("INSERT INTO alembic_version VALUES ('3f2a9c1b7e00')")
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    conn.commit()
    conn.close()
    before = file_state(path)
    db = Database(str(path))
    try:
        with pytest.raises(SchemaError):
            ensure_schema(db)
    finally:
        db.dispose()
    assert file_state(path) == before


def test_garbage_file_is_refused_and_untouched(tmp_path):
    path = tmp_path / "garbage.db"
    path.write_bytes(random.Random(1).randbytes(8192))
    before = file_state(path)
    db = Database(str(path))
    try:
        with pytest.raises(SchemaError, match="not a chat database"):
            ensure_schema(db)
    finally:
        db.dispose()
    assert file_state(path) == before
