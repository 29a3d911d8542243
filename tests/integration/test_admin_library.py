"""chatserver.admin on real SQLite files: stats, accounts, purge, backup, migrate."""

from __future__ import annotations

import os
import sqlite3
import stat
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from chatserver import admin
from chatserver.domain import Account
from chatserver.errors import InvalidPassword, NoSuchAccount
from chatserver.passwords import HashParameters, PasswordHasher
from chatserver.storage.database import Database
from chatserver.storage.migrate import ensure_schema, head_revision, schema_status, upgrade
from chatserver.storage.tables import messages, send_receipts

DAY = admin.DAY_MS
NOW = 1_790_000_000_000  # a fixed "now" (ms), 2026-09-21


@pytest.fixture
def db(tmp_path):
    database = Database(str(tmp_path / "chat.db"))
    ensure_schema(database)
    yield database
    database.dispose()


@pytest.fixture(scope="module")
def hasher():
    return PasswordHasher(HashParameters(time_cost=1, memory_kib=64))


def add_account(db: Database, name: str, created: int = NOW - 10 * DAY) -> Account:
    with db.unit_of_work() as uow:
        account = uow.repo.add_account(name, name.casefold(), "not-a-hash", created)
        uow.commit()
    return account


def add_message(db: Database, sender: Account, recipient: Account, sent_at: int,
                client_msg_id: str = "") -> int:
    with db.unit_of_work() as uow:
        message_id = uow.repo.add_message(sender, recipient.id, "hi", sent_at, client_msg_id)
        uow.commit()
    return message_id


def message_ids(db: Database) -> list[int]:
    return db.read(lambda repo: list(repo.conn.execute(
        select(messages.c.id).order_by(messages.c.id)).scalars()))


def receipt_count(db: Database) -> int:
    return db.read(lambda repo: len(repo.conn.execute(select(send_receipts)).all()))


# -- accounts ---------------------------------------------------------------------------------


def test_show_account_counts_undelivered_and_oldest(db):
    alice, bob = add_account(db, "Alice"), add_account(db, "bob")
    add_message(db, bob, alice, NOW - 3 * DAY)
    add_message(db, bob, alice, NOW - 1 * DAY)
    details = admin.show_account(db, "ALICE")
    assert details.account.name == "Alice"
    assert details.undelivered == 2
    assert details.oldest_undelivered_at == NOW - 3 * DAY
    empty = admin.show_account(db, "bob")
    assert (empty.undelivered, empty.oldest_undelivered_at) == (0, None)


@pytest.mark.parametrize("name", ["nobody", "not a name!", ""])
def test_show_account_unknown_or_invalid_name(db, name):
    with pytest.raises(NoSuchAccount, match="there is no account named"):
        admin.show_account(db, name)


def test_delete_account_discards_incoming_and_keeps_what_it_sent(db):
    alice, bob = add_account(db, "alice"), add_account(db, "bob")
    add_message(db, bob, alice, NOW, client_msg_id="m1")
    add_message(db, bob, alice, NOW)
    to_bob = add_message(db, alice, bob, NOW, client_msg_id="a1")
    account, discarded = admin.delete_account(db, "Alice")
    assert (account.name, discarded) == ("alice", 2)
    assert db.read(lambda repo: repo.get_by_key("alice")) is None
    assert [m.id for m in db.read(lambda repo: repo.undelivered(bob.id, 10))] == [to_bob]
    assert receipt_count(db) == 1  # bob's receipt stays; alice's went with her
    with pytest.raises(NoSuchAccount):
        admin.delete_account(db, "alice")


def test_reset_password(db, hasher):
    alice = add_account(db, "alice")
    admin.reset_password(db, "alice", "new-password-1", hasher)
    stored = db.read(lambda repo: repo.password_hash(alice.id))
    assert hasher.verify(stored, "new-password-1")
    assert not hasher.verify(stored, "not-a-hash")


def test_reset_password_refuses_short_password_and_unknown_account(db, hasher):
    alice = add_account(db, "alice")
    with pytest.raises(InvalidPassword):
        admin.reset_password(db, "alice", "short", hasher)
    with pytest.raises(NoSuchAccount):
        admin.reset_password(db, "nobody", "long-enough-pw", hasher)
    assert db.read(lambda repo: repo.password_hash(alice.id)) == "not-a-hash"


# -- stats ------------------------------------------------------------------------------------


def test_stats_of_an_empty_database(db):
    s = admin.stats(db)
    assert (s.accounts, s.undelivered, s.oldest_undelivered_at) == (0, 0, None)
    assert s.revision == s.head == head_revision()
    assert s.database_bytes == os.path.getsize(db.path) + (
        os.path.getsize(db.path + "-wal") if os.path.exists(db.path + "-wal") else 0)


def test_stats_counts(db):
    alice, bob, _carol = (add_account(db, n) for n in ("alice", "bob", "carol"))
    add_message(db, bob, alice, NOW - 5 * DAY)
    add_message(db, alice, bob, NOW - 2 * DAY)
    add_message(db, alice, bob, NOW)
    s = admin.stats(db)
    assert (s.accounts, s.undelivered, s.oldest_undelivered_at) == (3, 3, NOW - 5 * DAY)
    assert s.database_bytes > 0


# -- purge ------------------------------------------------------------------------------------


def test_plan_counts_without_changing_anything(db):
    alice, bob = add_account(db, "alice"), add_account(db, "bob")
    add_message(db, bob, alice, NOW - 40 * DAY, client_msg_id="x")
    add_message(db, alice, bob, NOW - 31 * DAY)
    add_message(db, alice, bob, NOW - 29 * DAY)
    plan = admin.plan_purge(db, messages_before=admin.cutoff(30, NOW),
                            receipts_before=admin.cutoff(7, NOW))
    assert plan == admin.PurgeCounts(messages=2, recipients=2, receipts=1)
    assert len(message_ids(db)) == 3 and receipt_count(db) == 1


def test_purge_removes_only_older_messages_in_batches(db):
    alice, bob = add_account(db, "alice"), add_account(db, "bob")
    old = [add_message(db, bob, alice, NOW - (40 + i) * DAY) for i in range(5)]
    recent = [add_message(db, bob, alice, NOW - i * DAY) for i in range(3)]
    old.append(add_message(db, alice, bob, NOW - 31 * DAY))
    seen = []
    done = admin.purge(db, messages_before=admin.cutoff(30, NOW), batch_size=2,
                       progress=lambda d, t: seen.append((d, t)))
    assert (done.messages, done.receipts) == (6, 0)
    assert message_ids(db) == recent
    assert seen[0] == (0, 6) and seen[-1] == (6, 6)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert len(seen) >= 5  # 3 batches of 2, reported one by one


def test_purge_receipts_only(db):
    alice, bob = add_account(db, "alice"), add_account(db, "bob")
    for i in range(5):
        add_message(db, bob, alice, NOW - (10 + i) * DAY, client_msg_id=f"old{i}")
    add_message(db, bob, alice, NOW, client_msg_id="new")
    done = admin.purge(db, receipts_before=admin.cutoff(7, NOW), batch_size=2)
    assert (done.messages, done.receipts) == (0, 5)
    assert receipt_count(db) == 1
    assert len(message_ids(db)) == 6  # the messages themselves stay


def test_purge_receipts_walks_every_key_whatever_the_ages_in_between(db):
    """Receipts are purged by a walk of their key (no created_at index): old ones after
    long runs of recent ones, of any sender, are all found; the recent ones all stay."""
    alice, bob, carol = (add_account(db, n) for n in ("alice", "bob", "carol"))
    kept = set()
    for sender in (alice, carol):
        for i in range(7):
            old = i % 3 == 2  # keys c0..c6: recent, recent, old, recent, recent, old, recent
            add_message(db, sender, bob, NOW - (20 if old else 1) * DAY, client_msg_id=f"c{i}")
            if not old:
                kept.add((sender.id, f"c{i}"))
    seen = []
    done = admin.purge(db, receipts_before=admin.cutoff(7, NOW), batch_size=2,
                       progress=lambda d, t: seen.append((d, t)))
    assert done.receipts == 4
    left = db.read(lambda repo: repo.conn.execute(
        select(send_receipts.c.sender_id, send_receipts.c.client_msg_id)).all())
    assert {(r[0], r[1]) for r in left} == kept
    assert seen[0] == (0, 4) and seen[-1] == (4, 4)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_purge_with_nothing_old(db):
    alice, bob = add_account(db, "alice"), add_account(db, "bob")
    add_message(db, bob, alice, NOW)
    assert admin.purge(db, messages_before=admin.cutoff(1, NOW)) == admin.PurgeCounts()
    assert len(message_ids(db)) == 1


# -- backup -----------------------------------------------------------------------------------


def test_backup_is_a_usable_private_copy(db, tmp_path):
    alice, bob = add_account(db, "alice"), add_account(db, "bob")
    add_message(db, bob, alice, NOW)
    dest = tmp_path / "copy.db"
    result = admin.backup(db, str(dest))
    assert result.path == str(dest) and result.bytes == os.path.getsize(dest)
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]
    copy = Database(str(dest))
    try:
        assert schema_status(copy).state == "current"
        assert admin.stats(copy).accounts == 2
        assert admin.show_account(copy, "alice").undelivered == 1
    finally:
        copy.dispose()


def test_backup_copies_one_snapshot_while_others_write(db, tmp_path):
    """Writes between backup steps neither restart the copy nor appear in it."""
    alice, bob = add_account(db, "alice"), add_account(db, "bob")
    for _ in range(200):  # a few dozen pages
        add_message(db, bob, alice, NOW)
    before = message_ids(db)
    writer = sqlite3.connect(db.path, timeout=30)
    steps = []

    def write_between_steps(done, total):
        steps.append((done, total))
        writer.execute("INSERT INTO messages (recipient_id, sender_id, sender_name, sent_at, body)"
                       " VALUES (?, ?, 'bob', ?, ?)", (alice.id, bob.id, NOW, "x" * 2000))
        writer.commit()

    try:
        result = admin.backup(db, str(tmp_path / "copy.db"), step_pages=1,
                              progress=write_between_steps)
    finally:
        writer.close()
    assert len(steps) == result.pages + 1  # one report per page, plus the start
    assert steps[-1] == (result.pages, result.pages)
    assert len(message_ids(db)) == len(before) + len(steps)
    copy = Database(result.path)
    try:
        assert message_ids(copy) == before
    finally:
        copy.dispose()


def test_backup_refuses_an_existing_destination_or_missing_directory(db, tmp_path):
    (tmp_path / "taken.db").write_text("keep me")
    with pytest.raises(admin.AdminError, match="already exists"):
        admin.backup(db, str(tmp_path / "taken.db"))
    assert (tmp_path / "taken.db").read_text() == "keep me"
    with pytest.raises(admin.AdminError, match="no directory"):
        admin.backup(db, str(tmp_path / "missing" / "copy.db"))


def test_backup_refuses_other_backends():
    with pytest.raises(admin.AdminError, match="pg_dump"):
        admin.backup(SimpleNamespace(is_sqlite=False), "/tmp/never")


# -- migrate, files ---------------------------------------------------------------------------


def test_migrate_backs_up_then_upgrades_a_database_behind_head(tmp_path):
    db = Database(str(tmp_path / "old.db"))
    try:
        upgrade(db, "0001")
        with db.write_engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO accounts (name, name_key, password_hash, created_at)"
                                 " VALUES ('alice', 'alice', 'h', 5)")
        steps = []
        result = admin.migrate(db, on_step=steps.append)
        assert (result.before.state, result.before.current, result.head) == ("behind", "0001",
                                                                             head_revision())
        assert result.changed
        assert os.path.basename(result.backup_path).startswith(f"old.db.before-{result.head}-")
        assert stat.S_IMODE(os.stat(result.backup_path).st_mode) == 0o600
        assert [s.split()[0] for s in steps] == ["backing", "upgrading"]
        assert schema_status(db).state == "current"
        assert admin.show_account(db, "alice").account.last_login_at == 5
        again = admin.migrate(db)
        assert not again.changed and again.backup_path is None
    finally:
        db.dispose()
    saved = Database(result.backup_path)
    try:
        assert schema_status(saved).current == "0001"
    finally:
        saved.dispose()


def test_migrate_creates_schema_in_an_empty_file(tmp_path):
    path = str(tmp_path / "new.db")
    admin.create_private_file(path)
    db = Database(path)
    try:
        result = admin.migrate(db)
        assert result.before.state == "empty" and result.backup_path is None
        assert schema_status(db).state == "current"
    finally:
        db.dispose()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_migrate_and_require_head_refuse_newer_and_foreign_databases(db, tmp_path):
    with db.write_engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(admin.AdminError, match="newer version of chat"):
        admin.migrate(db)
    with pytest.raises(admin.AdminError, match="newer version of chat"):
        admin.require_head(db)
    foreign = Database(str(tmp_path / "other.db"))
    try:
        with foreign.write_engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x)")
        with pytest.raises(admin.AdminError, match="not a chat database"):
            admin.migrate(foreign)
        with pytest.raises(admin.AdminError, match="not a chat database"):
            admin.require_head(foreign)
    finally:
        foreign.dispose()


def test_require_head_refuses_a_database_behind(tmp_path):
    db = Database(str(tmp_path / "old.db"))
    try:
        upgrade(db, "0001")
        with pytest.raises(admin.AdminError, match="run: chat admin migrate --db old.db"):
            admin.require_head(db, "old.db")
    finally:
        db.dispose()


def test_private_files_and_world_readable(tmp_path):
    path = str(tmp_path / "f")
    admin.create_private_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert admin.world_readable(path) is None
    with pytest.raises(admin.AdminError, match="already exists"):
        admin.create_private_file(path)
    os.chmod(path, 0o644)
    assert admin.world_readable(path) == 0o644
    assert admin.world_readable(str(tmp_path / "missing")) is None
