"""An old database upgraded by `chat admin migrate` and by `chat serve`, then used for real.

The database at revision 0001 (accounts with real Argon2 hashes, undelivered messages) comes
from test_migrations.old_db; after the upgrade, alice logs in through a real server with her
old password and fetches her old messages.
"""

from __future__ import annotations

import subprocess

from tests.conftest import ServerProcess, chat_command
from tests.migrations.test_migrations import PEOPLE, backups_of, hasher, old_db, revision_of  # noqa: F401

ALICE_INBOX = [(10, "bob", "first for alice"), (12, "Carol.X", "second for alice ☺"),
               (15, "Ghost", "from a deleted account")]


def fetch_inbox(server: ServerProcess, name: str) -> list[tuple[int, str, str]]:
    client = server.client()
    try:
        reply = client.login(name, PEOPLE[name])
        assert reply.pending == len(ALICE_INBOX)
        return [(m.id, m.sender, m.body) for m in client.fetch(100).messages]
    finally:
        client.close()


def test_admin_migrate_then_serve(old_db):
    result = subprocess.run(chat_command("admin", "migrate", "--db", str(old_db)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert revision_of(old_db) == "0004"
    assert len(backups_of(old_db)) == 1
    server = ServerProcess(old_db, ["--no-migrate"]).start()
    try:
        assert fetch_inbox(server, "Alice") == ALICE_INBOX
    finally:
        assert server.stop() == 0


def test_serve_backs_up_and_upgrades_then_serves(old_db):
    server = ServerProcess(old_db).start()
    try:
        assert revision_of(old_db) == "0004"
        backups = backups_of(old_db)
        assert len(backups) == 1 and revision_of(backups[0]) == "0001"
        assert fetch_inbox(server, "Alice") == ALICE_INBOX
    finally:
        assert server.stop() == 0
    log = server.log
    assert "backed up" in log and "upgraded from 0001 to 0004" in log
