"""DeleteAccount: password check, discarded messages, other sessions, the freed name."""

from __future__ import annotations

import subprocess

import pytest

from chatserver.protocol import (
    AccountDeleted,
    DeleteAccount,
    LoggedIn,
    Notice,
    Ping,
    Pong,
    Register,
    Send,
    Sent,
)
from chatserver.storage.database import SYNC_LEVELS

from .helpers import PASSWORD, drain, error_code, fetch_all, next_notice, next_push
from .rawframes import RawClient


def test_wrong_password_is_invalid_credentials_and_changes_nothing(user, connect):
    alice = user("alice")
    bob = user("bob")
    queued = bob.send("alice", "still here").message_id
    assert error_code(lambda: alice.delete_account(PASSWORD + "!")) == "invalid_credentials"
    assert error_code(lambda: alice.delete_account("")) == "invalid_credentials"
    # still logged in, still the same account with the same messages and password
    assert [m.id for m in fetch_all(alice)] == [queued]
    assert connect().login("alice", PASSWORD).pending == 1


def test_delete_reports_discarded_and_returns_to_anonymous(user, connect):
    alice = user("alice")
    bob = user("bob")
    for i in range(3):
        bob.send("alice", f"m{i}")
    acked = bob.send("alice", "acked").message_id
    assert alice.ack([acked]) == 1
    reply = alice.submit(lambda rid: DeleteAccount(request_id=rid, password=PASSWORD)).result(10)
    assert reply == AccountDeleted(request_id=reply.request_id, discarded=3)
    # the deleting connection is anonymous now
    assert error_code(lambda: alice.fetch()) == "not_logged_in"
    assert error_code(lambda: alice.send("bob", "x")) == "not_logged_in"
    # and the account is gone
    assert alice.list_accounts("alice").accounts == ()
    assert error_code(lambda: connect().login("alice", PASSWORD)) == "invalid_credentials"
    assert error_code(lambda: bob.send("alice", "hello?")) == "no_such_account"
    # the connection itself can go on: a new login works
    assert alice.login("bob", PASSWORD).name == "bob"


def test_delete_with_nothing_queued_discards_zero(user):
    assert user("lonely").delete_account(PASSWORD) == 0


def test_other_sessions_get_notice_and_become_anonymous(user, connect):
    alice = user("alice")
    other = connect()
    other.login("ALICE", PASSWORD)
    third = connect()
    third.login("alice", PASSWORD)
    bystander = user("bob")

    assert alice.delete_account(PASSWORD) == 0
    for session in (other, third):
        notice = next_notice(session)
        assert isinstance(notice, Notice)
        assert notice.code == "account_deleted"
        assert error_code(lambda s=session: s.send("bob", "ghost")) == "not_logged_in"
        assert error_code(lambda s=session: s.fetch()) == "not_logged_in"
        assert error_code(lambda s=session: s.logout()) == "not_logged_in"
        assert not session.closed  # logged out, not disconnected
    # the deleting session gets no notice of its own
    assert drain(alice) == []
    # no one else was told
    assert drain(bystander) == []
    # the notified sessions may log in again as someone else
    assert other.login("bob", PASSWORD).name == "bob"
    assert bystander.list_accounts("alice").accounts == ()


def test_sent_messages_stay_deliverable_under_the_senders_name(user, connect):
    alice = user("Alice")
    user("carol").logout()
    ids = [alice.send("carol", f"before deletion {i}").message_id for i in range(2)]
    assert alice.delete_account(PASSWORD) == 0
    carol = connect()
    assert carol.login("carol", PASSWORD).pending == 2
    got = fetch_all(carol)
    assert [(m.id, m.sender, m.body) for m in got] == [
        (ids[i], "Alice", f"before deletion {i}") for i in range(2)]
    assert carol.ack(ids) == 2
    assert fetch_all(carol) == []


def test_pushed_messages_of_a_deleted_sender_remain_fetchable(user):
    alice = user("alice")
    carol = user("carol")
    sent = alice.send("carol", "pushed then orphaned").message_id
    assert next_push(carol).message.id == sent
    alice.delete_account(PASSWORD)
    [message] = fetch_all(carol)
    assert (message.id, message.sender) == (sent, "alice")


def test_name_is_free_again_and_new_account_sees_nothing_old(user, connect):
    old = user("Alice")
    bob = user("bob")
    for i in range(3):
        bob.send("alice", f"for the old alice {i}")
    assert old.delete_account(PASSWORD) == 3

    new = connect()
    reply = new.register("alice", "another password")
    assert (reply.name, reply.pending) == ("alice", 0)
    assert fetch_all(new) == []
    # the old password does not open the new account
    assert error_code(lambda: connect().login("alice", PASSWORD)) == "invalid_credentials"
    # messages from now on do reach the new owner, with a fresh id
    sent = bob.send("ALICE", "for the new alice")
    assert sent.pushed is True
    assert next_push(new).message.body == "for the new alice"
    assert [m.body for m in fetch_all(new)] == ["for the new alice"]


def test_old_sessions_do_not_receive_for_the_new_owner(user, connect):
    """A session notified of the deletion must not get pushes meant for a new same-name account."""
    old = user("alice")
    old_second = connect()
    old_second.login("alice", PASSWORD)
    old.delete_account(PASSWORD)
    assert next_notice(old_second).code == "account_deleted"

    new = connect()
    new.register("alice", "another password")
    bob = user("bob")
    sent = bob.send("alice", "only for the new one")
    assert next_push(new).message.id == sent.message_id
    # a push to old_second would be queued before this reply
    for stale in (old, old_second):
        assert stale.list_accounts("alice").accounts[0].online is True
        assert drain(stale) == []


def test_idempotency_keys_of_a_deleted_sender_do_not_leak_to_the_new_owner(user, connect):
    old = user("alice")
    user("bob").logout()
    first = old.send("bob", "old", client_msg_id="k1")
    old.delete_account(PASSWORD)
    new = connect()
    new.register("alice", "another password")
    again = new.send("bob", "new", client_msg_id="k1")
    assert again.duplicate is False
    assert again.message_id != first.message_id
    bob = connect()
    bob.login("bob", PASSWORD)
    assert [(m.id, m.body) for m in fetch_all(bob)] == [
        (first.message_id, "old"), (again.message_id, "new")]


def test_admin_deletion_ends_live_sessions(server, user, root_conftest):
    """`chat admin delete-account` in another process: the running server ends the sessions."""
    alice = user("alice")
    bob = user("bob")
    bob.send("alice", "discarded with the account")
    kept = alice.send("bob", "stays deliverable").message_id
    assert next_push(alice).message.body == "discarded with the account"
    assert next_push(bob).message.id == kept
    result = subprocess.run(
        root_conftest.chat_command("admin", "delete-account", "alice", "--db",
                                   str(server.db_path), "--yes"),
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    notice = next_notice(alice)  # within a few seconds (the server checks periodically)
    assert notice.code == "account_deleted"
    assert error_code(lambda: alice.send("bob", "ghost")) == "not_logged_in"
    assert error_code(lambda: bob.send("alice", "anyone?")) == "no_such_account"
    assert [(m.id, m.sender) for m in fetch_all(bob)] == [(kept, "alice")]
    assert "Traceback" not in server.log


@pytest.mark.parametrize("sync", SYNC_LEVELS)
def test_sends_written_with_the_deletion_take_effect_before_it(server_factory, sync):
    """Lone sends and then DeleteAccount in one write: the sends are stored (and
    deliverable) before the account goes, also where the loop holds a turn's lone sends
    (sync normal). A Ping between them keeps each send alone (not a pipelined chunk)."""
    server = server_factory(extra_args=["--sync", sync])
    bob = server.client()
    bob.register("bob", PASSWORD)
    bob.logout()
    raw = RawClient(server.host, server.port)
    try:
        raw.hello()
        assert type(raw.request(Register(request_id=2, name="leaver", password=PASSWORD))) \
            is LoggedIn
        raw.send(Send(request_id=3, to="bob", body="first"), Ping(nonce=7),
                 Send(request_id=4, to="bob", body="last"),
                 DeleteAccount(request_id=5, password=PASSWORD))
        replies = [raw.reply() for _ in range(4)]
    finally:
        raw.close()
    assert [type(r) for r in replies] == [Sent, Pong, Sent, AccountDeleted]
    bob.login("bob", PASSWORD)
    assert [(m.sender, m.body) for m in fetch_all(bob)] == [("leaver", "first"),
                                                            ("leaver", "last")]
    bob.close()
