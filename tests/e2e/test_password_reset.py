"""`chat admin reset-password` while a server runs on the database: the sessions that logged in
with the old password end (Notice(password_reset), then anonymous); nobody else's do."""

from __future__ import annotations

import subprocess

from .helpers import PASSWORD, drain, error_code, next_notice, next_push

NEW_PASSWORD = "a brand new password"


def admin(root_conftest, server, *args: str, stdin: str | None = None) -> None:
    result = subprocess.run(
        root_conftest.chat_command("admin", *args, "--db", str(server.db_path)),
        input=stdin, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_admin_reset_ends_sessions_that_logged_in_before_it(server, user, connect,
                                                            root_conftest):
    alice, alice_too = user("alice"), connect()
    alice_too.login("alice", PASSWORD)
    bob = user("bob")
    # A cost other than the server's: the next login re-hashes, which is not a reset.
    admin(root_conftest, server, "reset-password", "alice", "--password-stdin",
          "--argon2-time-cost", "2", "--argon2-memory-kib", "128", stdin=NEW_PASSWORD + "\n")

    for stale in (alice, alice_too):  # within a few seconds (the server checks periodically)
        notice = next_notice(stale)
        assert notice.code == "password_reset"
        assert error_code(lambda s=stale: s.send("bob", "still me?")) == "not_logged_in"
    assert drain(bob) == []
    bob.send("alice", "bob is still logged in")  # (and alice is offline now)
    assert error_code(lambda: alice.login("alice", PASSWORD)) == "invalid_credentials"

    # Logging in with the new password (the server re-hashes it) starts a session that stays.
    alice.login("alice", NEW_PASSWORD)
    assert alice.list_accounts("alice").accounts[0].online is True
    # A sweep after that login: carol's deletion is noticed by the same periodic check.
    carol = user("carol")
    admin(root_conftest, server, "delete-account", "carol", "--yes")
    assert next_notice(carol).code == "account_deleted"
    assert drain(alice) == []
    sent = bob.send("alice", "pushed to the new session")
    assert sent.pushed is True
    assert next_push(alice).message.id == sent.message_id
    assert "Traceback" not in server.log
