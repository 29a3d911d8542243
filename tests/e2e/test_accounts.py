"""Register, login, logout, and what each connection state allows (PROTOCOL.md sections 4, 5)."""

from __future__ import annotations

import pytest

from chatserver.client import ServerError
from chatserver.protocol import (
    Ack,
    DeleteAccount,
    Error,
    Fetch,
    ListAccounts,
    LoggedIn,
    Logout,
    Ok,
    Send,
)

from .helpers import PASSWORD, error_code, next_push, pushes_until

# -- register ---------------------------------------------------------------------------------

def test_register_logs_in_with_the_name_as_registered(connect):
    client = connect()
    reply = client.register("Alice.B-2_x", PASSWORD)
    assert isinstance(reply, LoggedIn)
    assert reply.name == "Alice.B-2_x"
    assert reply.pending == 0
    assert client.fetch().messages == ()  # logged in: Fetch is allowed


def test_name_taken_without_regard_to_case(connect):
    connect().register("Alice", PASSWORD)
    other = connect()
    for variant in ("Alice", "alice", "ALICE", "aLiCe"):
        assert error_code(lambda v=variant: other.register(v, PASSWORD)) == "name_taken"
    # still anonymous after the refusals, and every case logs in to the one account
    assert other.login("aLICE", PASSWORD).name == "Alice"


def test_names_are_nfkc_normalised(connect):
    """Full-width letters are the ASCII they stand for: one account, not a look-alike."""
    first = connect()
    assert first.register("\uff42\uff4f\uff42", PASSWORD).name == "bob"  # "ｂｏｂ"
    assert error_code(lambda: connect().register("BOB", PASSWORD)) == "name_taken"
    assert connect().login("bob", PASSWORD).name == "bob"


@pytest.mark.parametrize("name", [
    "",
    "a" * 33,
    "has space",
    "slash/name",
    "semi;colon",
    "caf\u00e9",  # not ASCII after NFKC
    "tab\tname",
    "nul\x00",
], ids=["empty", "33-chars", "space", "slash", "semicolon", "accented", "tab", "nul"])
def test_invalid_names_are_refused(connect, name):
    client = connect()
    assert error_code(lambda: client.register(name, PASSWORD)) == "invalid_name"
    # the connection stays usable and anonymous
    assert client.register("valid_after", PASSWORD).name == "valid_after"


def test_longest_name_is_accepted(connect):
    name = "N" * 32
    assert connect().register(name, PASSWORD).name == name


@pytest.mark.parametrize("password", ["", "x" * 1025, "\u00e9" * 512 + "x"],
                         ids=["empty", "1025-ascii-bytes", "1025-utf8-bytes"])
def test_invalid_passwords_are_refused(connect, password):
    client = connect()
    assert error_code(lambda: client.register("pw_user", password)) == "invalid_password"
    # nothing was created: the name is still free
    assert client.list_accounts("pw_user").accounts == ()
    assert client.register("pw_user", PASSWORD).name == "pw_user"


def test_longest_password_in_bytes_is_accepted(connect):
    password = "\u00e9" * 512  # 512 characters, 1024 bytes of UTF-8
    connect().register("longpw", password)
    assert connect().login("longpw", password).name == "longpw"
    assert error_code(lambda: connect().login("longpw", password[:-1])) == "invalid_credentials"


# -- login ------------------------------------------------------------------------------------

def test_login_with_right_password(connect):
    connect().register("Carol", PASSWORD)
    reply = connect().login("carol", PASSWORD)
    assert reply == LoggedIn(request_id=reply.request_id, name="Carol", pending=0)


def test_invalid_credentials_identical_for_unknown_name_and_wrong_password(connect):
    connect().register("dave", PASSWORD)
    client = connect()
    errors = []
    for name, password in [("dave", PASSWORD + "x"), ("nobody", PASSWORD),
                           ("Dave", "wrong-password"), ("not a valid name", PASSWORD)]:
        with pytest.raises(ServerError) as info:
            client.login(name, password)
        errors.append((info.value.code, info.value.text))
    assert errors[0][0] == "invalid_credentials"
    assert len(set(errors)) == 1, errors  # same code and same text: no name probing
    assert client.login("dave", PASSWORD).name == "dave"


def test_already_logged_in(connect):
    client = connect()
    client.register("erin", PASSWORD)
    connect().register("frank", PASSWORD)
    assert error_code(lambda: client.login("frank", PASSWORD)) == "already_logged_in"
    assert error_code(lambda: client.register("gina", PASSWORD)) == "already_logged_in"
    assert error_code(lambda: client.login("erin", PASSWORD)) == "already_logged_in"
    # the refused Register created nothing, and the connection is still erin's
    assert client.list_accounts("gina").accounts == ()
    client.send("frank", "still erin")
    frank = connect()
    frank.login("frank", PASSWORD)
    assert [(m.sender, m.body) for m in frank.fetch().messages] == [("erin", "still erin")]


# -- not_logged_in ----------------------------------------------------------------------------

LOGIN_REQUIRED = [
    lambda rid: Logout(request_id=rid),
    lambda rid: Send(request_id=rid, to="target", client_msg_id="", body="hello"),
    lambda rid: Fetch(request_id=rid, limit=0),
    lambda rid: Ack(request_id=rid, message_ids=(1,)),
    lambda rid: DeleteAccount(request_id=rid, password=PASSWORD),
]
LOGIN_REQUIRED_IDS = ["Logout", "Send", "Fetch", "Ack", "DeleteAccount"]


@pytest.mark.parametrize("make", LOGIN_REQUIRED, ids=LOGIN_REQUIRED_IDS)
def test_not_logged_in_before_login(connect, make):
    connect().register("target", PASSWORD)
    client = connect()
    reply = client.submit(make).result(10)
    assert isinstance(reply, Error)
    assert reply.code == "not_logged_in"
    assert reply.request_id == 2  # Hello was 1
    # the connection stays open and anonymous
    assert client.list_accounts("target").accounts[0].name == "target"
    assert client.login("target", PASSWORD).name == "target"


@pytest.mark.parametrize("make", LOGIN_REQUIRED, ids=LOGIN_REQUIRED_IDS)
def test_not_logged_in_after_logout(connect, make):
    client = connect()
    client.register("target", PASSWORD)
    client.logout()
    reply = client.submit(make).result(10)
    assert isinstance(reply, Error)
    assert reply.code == "not_logged_in"
    # the account was not touched by the refused request: it still exists with its password
    assert connect().login("target", PASSWORD).name == "target"


def test_logout_replies_ok_and_allows_another_login(connect):
    connect().register("henry", PASSWORD)
    client = connect()
    client.register("iris", PASSWORD)
    reply = client.submit(lambda rid: Logout(request_id=rid)).result(10)
    assert reply == Ok(request_id=reply.request_id)
    assert client.login("henry", PASSWORD).name == "henry"
    sent = client.send("iris", "from henry")
    iris = connect()
    iris.login("iris", PASSWORD)
    [message] = iris.fetch().messages
    assert (message.id, message.sender, message.body) == (sent.message_id, "henry", "from henry")


def test_one_account_on_two_connections_both_receive_pushes(connect):
    first = connect()
    first.register("jack", PASSWORD)
    second = connect()
    assert second.login("JACK", PASSWORD).name == "jack"
    sender = connect()
    sender.register("kate", PASSWORD)

    sent = sender.send("jack", "to both")
    assert sent.pushed is True
    for client in (first, second):
        push = next_push(client)
        assert (push.message.id, push.message.sender, push.message.body) == (
            sent.message_id, "kate", "to both")

    # logging out one session leaves the other one receiving
    first.logout()
    sent2 = sender.send("jack", "only second")
    assert sent2.pushed is True
    assert [p.message.body for p in pushes_until(second, sent2.message_id)] == ["only second"]
    # first is anonymous now: it gets nothing more (a push to it would come before this reply)
    assert first.list_accounts("jack").accounts[0].online is True
    assert first.pushes.empty()


def test_list_accounts_request_id_and_anonymous_use(raw_connect):
    raw = raw_connect()
    raw.hello()
    reply = raw.request(ListAccounts(request_id=42, pattern="", after="", limit=0))
    assert reply.request_id == 42
    assert reply.accounts == ()
    assert reply.next_after == ""
