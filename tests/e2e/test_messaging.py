"""Send, live pushes, the offline queue and Fetch (PROTOCOL.md section 5)."""

from __future__ import annotations

import time

import pytest

from chatserver.client import ServerError
from chatserver.protocol import Push, Sent

from .helpers import PASSWORD, drain, error_code, fetch_all, next_push, pushes_until


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- refusals ---------------------------------------------------------------------------------

def test_send_to_unknown_account(user):
    alice = user("alice")
    assert error_code(lambda: alice.send("nobody", "hi")) == "no_such_account"
    assert error_code(lambda: alice.send("not a name!", "hi")) == "no_such_account"
    assert error_code(lambda: alice.send("", "hi")) == "no_such_account"


@pytest.mark.parametrize("to", ["a" * 65_535, "\x00" * 20_000, "\u00e9" * 32_000],
                         ids=["65535-ascii", "20000-nul", "32000-e-acute"])
def test_send_to_a_huge_invalid_name(server, user, to):
    """Any str the frame can carry is a name that does not exist: an Error reply, not a drop."""
    alice = user("alice")
    assert error_code(lambda: alice.send(to, "hi")) == "no_such_account"
    assert not alice.closed
    assert alice.list_accounts("alice").accounts[0].name == "alice"
    assert "Traceback" not in server.log


def test_empty_message(user):
    alice = user("alice")
    user("bob")
    assert error_code(lambda: alice.send("bob", "")) == "empty_message"
    assert alice.send("bob", " ").message_id > 0  # one byte is enough


def test_message_size_limit_is_in_utf8_bytes(user, connect):
    alice = user("alice")
    user("bob").logout()
    limit = alice.welcome.max_message_bytes
    assert limit == 65_536
    # 3-byte characters: the character count stays far below the limit on both sides
    exact = "\u20ac" * (limit // 3) + "a" * (limit % 3)
    assert len(exact.encode()) == limit
    over = exact + "a"
    assert len(over.encode()) == limit + 1
    assert error_code(lambda: alice.send("bob", over)) == "message_too_large"
    assert error_code(lambda: alice.send("bob", "\U0001F600" * (limit // 4 + 1))) == \
        "message_too_large"
    sent = alice.send("bob", exact)
    bob = connect()
    assert bob.login("bob", PASSWORD).pending == 1  # only the one that fit was stored
    [message] = fetch_all(bob)
    assert message.id == sent.message_id
    assert message.body == exact


def test_configured_message_limit(server_factory, tmp_path):
    server = server_factory(tmp_path / "small.db", ["--max-message-bytes", "10"])
    with server.client() as alice, server.client() as bob:
        alice.register("alice", PASSWORD)
        bob.register("bob", PASSWORD)
        assert alice.welcome.max_message_bytes == 10
        with pytest.raises(ServerError) as info:
            alice.send("bob", "\u00e9" * 5 + "x")  # 11 bytes, 6 characters
        assert info.value.code == "message_too_large"
        sent = alice.send("bob", "\u00e9" * 5)  # 10 bytes
        assert next_push(bob).message.body == "\u00e9" * 5
        assert [m.id for m in fetch_all(bob)] == [sent.message_id]


def test_client_msg_id_length_limit(user):
    alice = user("alice")
    user("bob")
    assert error_code(lambda: alice.send("bob", "x", client_msg_id="k" * 65)) == "invalid_request"
    assert error_code(lambda: alice.send("bob", "x", client_msg_id="\u00e9" * 33)) == \
        "invalid_request"  # 66 bytes, 33 characters
    assert alice.send("bob", "x", client_msg_id="k" * 64).duplicate is False


# -- Sent -------------------------------------------------------------------------------------

def test_sent_reports_pushed_false_for_offline_and_true_for_online(user, connect):
    alice = user("alice")
    user("bob").logout()
    offline = alice.send("bob", "while away")
    assert isinstance(offline, Sent)
    assert offline.pushed is False
    assert offline.duplicate is False
    assert offline.message_id > 0

    bob = connect()
    assert bob.login("bob", PASSWORD).pending == 1
    online = alice.send("BOB", "while here")  # any case
    assert online.pushed is True
    assert online.duplicate is False
    assert online.message_id > offline.message_id
    assert next_push(bob).message.id == online.message_id
    # the earlier one was not pushed at login: it waits for a Fetch
    assert [m.id for m in fetch_all(bob)] == [offline.message_id, online.message_id]
    assert drain(bob) == []


def test_send_to_nfkc_equivalent_name(user):
    alice = user("alice")
    bob = user("bob")
    sent = alice.send("\uff22\uff4f\uff42", "full width")  # "Ｂｏｂ"
    assert next_push(bob).message.id == sent.message_id


def test_idempotent_send_with_client_msg_id(user, connect):
    alice = user("alice")
    bob = user("bob")
    first = alice.send("bob", "once", client_msg_id="m-1")
    again = alice.send("bob", "once", client_msg_id="m-1")
    assert first.duplicate is False
    assert again.duplicate is True
    assert again.message_id == first.message_id
    assert again.pushed is False  # nothing new was stored or pushed
    # even a retry with another body stores nothing new
    third = alice.send("bob", "changed body", client_msg_id="m-1")
    assert (third.message_id, third.duplicate) == (first.message_id, True)
    barrier = alice.send("bob", "barrier")
    got = pushes_until(bob, barrier.message_id)
    assert [(p.message.id, p.message.body) for p in got] == [
        (first.message_id, "once"), (barrier.message_id, "barrier")]
    assert [(m.id, m.body) for m in fetch_all(bob)] == [
        (first.message_id, "once"), (barrier.message_id, "barrier")]


def test_duplicate_to_another_recipient_returns_the_original(user, connect):
    """The key is the sender's client_msg_id alone: a retry cannot fork a message."""
    alice = user("alice")
    user("bob").logout()
    user("carol").logout()
    first = alice.send("bob", "hello", client_msg_id="fork")
    other = alice.send("carol", "hello", client_msg_id="fork")
    assert (other.message_id, other.duplicate) == (first.message_id, True)
    carol = connect()
    assert carol.login("carol", PASSWORD).pending == 0
    bob = connect()
    bob.login("bob", PASSWORD)
    assert [m.id for m in fetch_all(bob)] == [first.message_id]


def test_client_msg_id_is_per_sender(user):
    alice = user("alice")
    carol = user("carol")
    bob = user("bob")
    a = alice.send("bob", "from alice", client_msg_id="same")
    c = carol.send("bob", "from carol", client_msg_id="same")
    assert (a.duplicate, c.duplicate) == (False, False)
    assert a.message_id != c.message_id
    assert [(m.sender, m.body) for m in fetch_all(bob)] == [
        ("alice", "from alice"), ("carol", "from carol")]


def test_duplicate_after_acknowledgement_still_stores_nothing(user):
    alice = user("alice")
    bob = user("bob")
    first = alice.send("bob", "hello", client_msg_id="retry-me")
    assert bob.ack([first.message_id]) == 1
    again = alice.send("bob", "hello", client_msg_id="retry-me")
    assert (again.message_id, again.duplicate) == (first.message_id, True)
    assert fetch_all(bob) == []


# -- live chat --------------------------------------------------------------------------------

def test_live_chat_between_two_clients(user):
    alice = user("Alice")
    bob = user("bob")
    before = now_ms()
    sent = alice.send("bob", "hi bob \U0001F44B")
    after = now_ms()
    assert sent.pushed is True
    push = next_push(bob)
    assert isinstance(push, Push)
    assert push.message.id == sent.message_id
    assert push.message.sender == "Alice"  # the name as registered
    assert push.message.body == "hi bob \U0001F44B"
    # the server's clock in ms since the epoch; same machine, so within a minute of ours
    assert before - 60_000 <= push.message.sent_at <= after + 60_000

    reply = bob.send("ALICE", "hi alice")
    back = next_push(alice)
    assert (back.message.id, back.message.sender, back.message.body) == (
        reply.message_id, "bob", "hi alice")
    assert drain(alice) == [] and drain(bob) == []


def test_bodies_round_trip_exactly(user):
    alice = user("alice")
    bob = user("bob")
    bodies = ["a", "multi\nline\r\n", "nul\x00inside", "tab\t", "\u00e9\u4e2d\U0001F600",
              "  spaces  ", "\ufeffbom", "x" * 10_000]
    ids = [alice.send("bob", body).message_id for body in bodies]
    got = pushes_until(bob, ids[-1])
    assert [(p.message.id, p.message.body) for p in got] == list(zip(ids, bodies, strict=True))
    assert [(m.id, m.body) for m in fetch_all(bob)] == list(zip(ids, bodies, strict=True))


# -- offline queue and Fetch ------------------------------------------------------------------

def test_offline_queue_then_fetch_oldest_first(user, connect):
    alice = user("alice")
    user("bob").logout()
    ids = [alice.send("bob", f"message {i}").message_id for i in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5

    bob = connect()
    assert bob.login("bob", PASSWORD).pending == 5
    reply = bob.fetch()
    assert [(m.id, m.sender, m.body) for m in reply.messages] == [
        (ids[i], "alice", f"message {i}") for i in range(5)]
    assert reply.remaining == 0
    sent_at = [m.sent_at for m in reply.messages]
    assert sent_at == sorted(sent_at)
    assert drain(bob) == []  # nothing is pushed for messages queued before the login


def test_fetch_limit_and_remaining(user, connect):
    alice = user("alice")
    user("bob").logout()
    ids = [alice.send("bob", f"m{i}").message_id for i in range(7)]
    bob = connect()
    bob.login("bob", PASSWORD)

    page = bob.fetch(3)
    assert [m.id for m in page.messages] == ids[:3]
    assert page.remaining == 4
    again = bob.fetch(3)  # nothing acknowledged: the same page again
    assert [m.id for m in again.messages] == ids[:3]
    assert again.remaining == 4

    assert bob.ack(ids[:3]) == 3
    page = bob.fetch(3)
    assert [m.id for m in page.messages] == ids[3:6]
    assert page.remaining == 1
    assert bob.ack(ids[3:6]) == 3
    page = bob.fetch(0)  # 0 = the default (100)
    assert [m.id for m in page.messages] == ids[6:]
    assert page.remaining == 0
    assert bob.ack(ids[6:]) == 1
    empty = bob.fetch(1000)
    assert (empty.messages, empty.remaining) == ((), 0)


def test_fetch_default_limit_and_maximum(user, connect):
    alice = user("alice")
    user("bob").logout()
    ids = [alice.send("bob", str(i)).message_id for i in range(120)]
    bob = connect()
    assert bob.login("bob", PASSWORD).pending == 120
    default = bob.fetch(0)
    assert [m.id for m in default.messages] == ids[:100]
    assert default.remaining == 20
    clamped = bob.fetch(0xFFFF)  # over the maximum of 1000: clamped, not refused
    assert [m.id for m in clamped.messages] == ids
    assert clamped.remaining == 0


def test_fetch_reply_fits_in_one_frame(user, connect):
    """Twenty 64 KiB messages exceed one 1 MiB frame: Fetch stops early and says so."""
    alice = user("alice")
    user("bob").logout()
    body = "z" * 65_536
    ids = [alice.send("bob", body).message_id for _ in range(20)]
    bob = connect()
    bob.login("bob", PASSWORD)
    seen = []
    while True:
        reply = bob.fetch(1000)
        assert reply.messages, "a page must make progress"
        assert len(reply.messages) < 20
        assert all(m.body == body for m in reply.messages)
        assert reply.remaining == 20 - len(seen) - len(reply.messages)
        page_ids = [m.id for m in reply.messages]
        seen += page_ids
        assert bob.ack(page_ids) == len(page_ids)
        if reply.remaining == 0:
            break
    assert seen == ids


def test_per_sender_order_is_kept(user, connect):
    alice = user("alice")
    carol = user("carol")
    user("bob").logout()
    sent = []
    for i in range(10):
        for sender, name in ((alice, "alice"), (carol, "carol")):
            sent.append((sender.send("bob", f"{name} {i}").message_id, name, f"{name} {i}"))
    bob = connect()
    bob.login("bob", PASSWORD)
    got = [(m.id, m.sender, m.body) for m in fetch_all(bob)]
    assert got == sorted(sent)
    for name in ("alice", "carol"):
        assert [b for _, s, b in got if s == name] == [f"{name} {i}" for i in range(10)]


def test_message_ids_are_never_reused(user):
    """Acknowledging the newest message must not free its id for the next one."""
    alice = user("alice")
    bob = user("bob")
    first = alice.send("bob", "one").message_id
    assert bob.ack([first]) == 1
    second = alice.send("bob", "two").message_id
    assert second > first
    assert bob.ack([second]) == 1
    third = alice.send("bob", "three").message_id
    assert third > second
