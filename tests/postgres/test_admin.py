"""`chat admin` on a PostgreSQL URL: the library's statistics and purge, and the command line."""

from __future__ import annotations

import json
import subprocess

from chatserver import admin
from chatserver.domain import Account, name_key
from chatserver.storage.database import Database
from chatserver.storage.migrate import head_revision
from tests.conftest import chat_command
from tests.postgres.conftest import raw

DAY = 86_400_000
NOW = 1_700_000_000_000


def add_account(db: Database, name: str) -> Account:
    with db.unit_of_work() as uow:
        account = uow.repo.add_account(name, name_key(name), "not-a-hash", NOW - 10 * DAY)
        uow.commit()
    return account


def add_message(db: Database, sender: Account, recipient: Account, sent_at: int,
                client_msg_id: str = "") -> int:
    with db.unit_of_work() as uow:
        message_id = uow.repo.add_message(sender, recipient.id, "x", sent_at, client_msg_id)
        uow.commit()
    return message_id


def test_stats_and_purge(db):
    alice, bob = add_account(db, "alice"), add_account(db, "bob")
    old = [add_message(db, bob, alice, NOW - (40 + i) * DAY, client_msg_id=f"old\x00{i}")
           for i in range(5)]
    recent = add_message(db, bob, alice, NOW, client_msg_id="new")
    s = admin.stats(db)
    assert (s.accounts, s.undelivered, s.oldest_undelivered_at) == (2, 6, NOW - 44 * DAY)
    assert s.revision == s.head == head_revision()
    assert s.database_bytes > 0  # pg_database_size
    plan = admin.plan_purge(db, messages_before=admin.cutoff(30, NOW),
                            receipts_before=admin.cutoff(7, NOW))
    assert plan == admin.PurgeCounts(messages=5, recipients=1, receipts=5)
    done = admin.purge(db, messages_before=admin.cutoff(30, NOW),
                       receipts_before=admin.cutoff(7, NOW), batch_size=2)
    assert (done.messages, done.receipts) == (5, 5)
    assert raw(db, "SELECT id FROM messages") == [(recent,)]
    assert raw(db, "SELECT convert_from(client_msg_id, 'UTF8') FROM send_receipts") == [("new",)]
    assert all(i < recent for i in old)


def test_command_line_on_a_url(db, pg_url):
    alice, bob = add_account(db, "alice"), add_account(db, "Bob")
    add_message(db, alice, bob, NOW)

    def chat(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(chat_command("admin", *args, "--db", pg_url), check=False,
                              capture_output=True, text=True, timeout=120)

    listed = chat("list-accounts", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(r["name"], r["undelivered"]) for r in json.loads(listed.stdout)] == [
        ("alice", 0), ("Bob", 1)]
    deleted = chat("delete-account", "bob", "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert raw(db, "SELECT name FROM accounts") == [("alice",)]
    assert raw(db, "SELECT count(*) FROM messages") == [(0,)]
    backup = chat("backup", "/tmp/never-written.db")
    assert backup.returncode == 1 and "pg_dump" in backup.stderr
