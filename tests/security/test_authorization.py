"""Authorization: a session acts only as its own account.

A table runs every operation that needs a login in every state without one (before login,
after logout, after the account was deleted from another connection, or by the admin tool),
each aimed at another account's data, and checks both the refusal and that nothing changed.
Then the operations of a logged-in session aimed at another account.
"""

from __future__ import annotations

import dataclasses
import itertools
import subprocess

import pytest

from chatserver.client import ChatClient, ServerError
from chatserver.protocol import (
    REQUEST_TYPES,
    Ack,
    DeleteAccount,
    Error,
    Fetch,
    Logout,
    Notice,
    Push,
    Send,
)
from tests.conftest import ServerProcess, chat_command

from .conftest import PASSWORD, WAIT

_ids = itertools.count(1)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One server for the module; every test uses names of its own."""
    server = ServerProcess(tmp_path_factory.mktemp("authz") / "chat.db",
                           ["--registrations-per-hour", "0", "--login-free-failures", "-1"])
    yield server.start()
    server.kill()


@pytest.fixture
def open_client(shared):
    opened: list[ChatClient] = []

    def make() -> ChatClient:
        client = shared.client(timeout=WAIT)
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.close()


class Victim:
    """Another account with a message waiting for it."""

    def __init__(self, open_client):
        n = next(_ids)
        self.name, self.password = f"victim{n}", f"victim-password-{n}"
        sender = open_client()
        sender.register(f"sender{n}", PASSWORD)
        open_client().register(self.name, self.password)
        self.message_id = sender.send(self.name, "for the victim only").message_id
        self._open = open_client

    def assert_untouched(self) -> None:
        with self._open() as own:
            reply = own.login(self.name, self.password)
            assert reply.pending == 1
            [message] = own.fetch().messages
            assert (message.id, message.body) == (self.message_id, "for the victim only")


# -- the table: every login-only operation, in every state without a login -------------------------

OPERATIONS = {
    "Logout": lambda v: lambda rid: Logout(request_id=rid),
    "Send": lambda v: lambda rid: Send(request_id=rid, to=v.name, client_msg_id="", body="hi"),
    "Fetch": lambda v: lambda rid: Fetch(request_id=rid, limit=0),
    "Ack": lambda v: lambda rid: Ack(request_id=rid, message_ids=(v.message_id,)),
    "DeleteAccount": lambda v: lambda rid: DeleteAccount(request_id=rid, password=v.password),
}


def before_login(open_client, shared) -> ChatClient:
    return open_client()


def after_logout(open_client, shared) -> ChatClient:
    client = open_client()
    client.register(f"leaver{next(_ids)}", PASSWORD)
    client.logout()
    return client


def after_deleted_elsewhere(open_client, shared) -> ChatClient:
    """Logged in on this connection; the account is deleted on another connection."""
    name = f"doomed{next(_ids)}"
    client = open_client()
    client.register(name, PASSWORD)
    other = open_client()
    other.login(name, PASSWORD)
    other.delete_account(PASSWORD)
    notice = client.pushes.get(timeout=WAIT)
    assert isinstance(notice, Notice) and notice.code == "account_deleted", notice
    return client


def after_deleted_by_admin(open_client, shared) -> ChatClient:
    """Logged in on this connection; ``chat admin delete-account`` removes the account."""
    name = f"banned{next(_ids)}"
    client = open_client()
    client.register(name, PASSWORD)
    result = subprocess.run(chat_command("admin", "delete-account", name, "--yes",
                                         "--db", str(shared.db_path)),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    notice = client.pushes.get(timeout=WAIT)  # the server notices within seconds
    assert isinstance(notice, Notice) and notice.code == "account_deleted", notice
    return client


def after_deleting_itself(open_client, shared) -> ChatClient:
    client = open_client()
    client.register(f"quitter{next(_ids)}", PASSWORD)
    client.delete_account(PASSWORD)
    return client


STATES = {
    "before-login": before_login,
    "after-logout": after_logout,
    "after-deleted-elsewhere": after_deleted_elsewhere,
    "after-deleting-itself": after_deleting_itself,
}


@pytest.mark.parametrize("operation", OPERATIONS, ids=str)
@pytest.mark.parametrize("state", STATES, ids=str)
def test_operation_without_a_login_is_refused_and_changes_nothing(shared, open_client, state,
                                                                  operation):
    victim = Victim(open_client)
    client = STATES[state](open_client, shared)
    reply = client.submit(OPERATIONS[operation](victim)).result(WAIT)
    assert isinstance(reply, Error), reply
    assert reply.code == "not_logged_in"
    victim.assert_untouched()
    # the connection stays open and anonymous: it can still log in (to an account of its own)
    own = f"later{next(_ids)}"
    assert client.register(own, PASSWORD).name == own


def test_every_operation_after_the_admin_deleted_the_account(shared, open_client):
    """The same table for a deletion by ``chat admin`` (another process; one deletion for all
    five operations, since each takes the server's periodic account check)."""
    victim = Victim(open_client)
    client = after_deleted_by_admin(open_client, shared)
    for name, make in OPERATIONS.items():
        reply = client.submit(make(victim)).result(WAIT)
        assert isinstance(reply, Error) and reply.code == "not_logged_in", (name, reply)
    victim.assert_untouched()


# -- no request can name the acting account -------------------------------------------------------

def test_no_request_names_the_account_it_acts_as():
    """Identity comes from the session alone: the only requests with an account name or a
    password are the ones that establish or prove the session."""
    fields = {cls.__name__: tuple(f.name for f in dataclasses.fields(cls)) for cls in REQUEST_TYPES}
    assert fields == {
        "Hello": ("request_id", "version", "client"),
        "Register": ("request_id", "name", "password"),
        "Login": ("request_id", "name", "password"),
        "Logout": ("request_id",),
        "ListAccounts": ("request_id", "pattern", "after", "limit"),
        "Send": ("request_id", "to", "client_msg_id", "body"),  # to: the recipient
        "Fetch": ("request_id", "limit"),
        "Ack": ("request_id", "message_ids"),
        "DeleteAccount": ("request_id", "password"),  # the session's own password
    }


# -- logged in, aimed at another account ------------------------------------------------------------

def test_ack_of_another_accounts_messages_removes_nothing(open_client):
    victim = Victim(open_client)
    mallory = open_client()
    mallory.register(f"mallory{next(_ids)}", PASSWORD)
    assert mallory.ack([victim.message_id]) == 0
    assert mallory.ack(range(max(1, victim.message_id - 50), victim.message_id + 50)) == 0
    victim.assert_untouched()


def test_fetch_returns_only_the_sessions_own_messages(open_client):
    victims = [Victim(open_client) for _ in range(3)]
    mallory_name = f"mallory{next(_ids)}"
    mallory = open_client()
    mallory.register(mallory_name, PASSWORD)
    friend = open_client()
    friend.register(f"friend{next(_ids)}", PASSWORD)
    mine = friend.send(mallory_name, "for mallory").message_id
    reply = mallory.fetch(1000)
    assert [m.id for m in reply.messages] == [mine] and reply.remaining == 0
    for victim in victims:
        victim.assert_untouched()


def test_pushes_go_only_to_the_recipients_sessions(open_client):
    n = next(_ids)
    alice, bob, eve = open_client(), open_client(), open_client()
    alice.register(f"alice{n}", PASSWORD)
    bob.register(f"bob{n}", PASSWORD)
    eve.register(f"eve{n}", PASSWORD)
    sent = alice.send(f"bob{n}", "private")
    push = bob.pushes.get(timeout=WAIT)
    assert isinstance(push, Push) and push.message.id == sent.message_id
    # eve's connection gets a reply to her own request, and nothing pushed before it
    eve.fetch()
    assert eve.pushes.empty()


def test_delete_account_needs_the_sessions_own_password(open_client):
    victim = Victim(open_client)
    name = f"mallory{next(_ids)}"
    mallory = open_client()
    mallory.register(name, PASSWORD)
    for password in (victim.password, "wrong password"):
        with pytest.raises(ServerError) as info:
            mallory.delete_account(password)
        assert info.value.code == "invalid_credentials"
    victim.assert_untouched()
    # still mallory, still there; her own password deletes her own account only
    assert mallory.fetch().messages == ()
    mallory.delete_account(PASSWORD)
    victim.assert_untouched()
    with pytest.raises(ServerError):
        open_client().login(name, PASSWORD)


def test_a_message_always_carries_the_senders_own_name(open_client):
    """There is no way to send as someone else: the sender is the session's account."""
    victim = Victim(open_client)
    n = next(_ids)
    mallory, bob = open_client(), open_client()
    mallory.register(f"mallory{n}", PASSWORD)
    bob.register(f"bob{n}", PASSWORD)
    mallory.send(f"bob{n}", f"this is {victim.name}, trust me")
    [message] = bob.fetch().messages
    assert message.sender == f"mallory{n}"


def test_logout_ends_only_this_connections_session(open_client):
    n = next(_ids)
    first, second = open_client(), open_client()
    first.register(f"twice{n}", PASSWORD)
    second.login(f"twice{n}", PASSWORD)
    first.logout()
    assert second.fetch().messages == ()  # still logged in
    with pytest.raises(ServerError) as info:
        first.fetch()
    assert info.value.code == "not_logged_in"
