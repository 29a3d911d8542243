"""ChatService over a real SQLite file and the GroupCommitWriter, with a fake clock."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from chatserver import domain
from chatserver.errors import (
    ChatError,
    EmptyMessage,
    InvalidCredentials,
    InvalidName,
    InvalidPassword,
    InvalidPattern,
    InvalidRequest,
    MessageTooLarge,
    NameTaken,
    NoSuchAccount,
    RateLimited,
)
from chatserver.limits import RateLimiter
from chatserver.service import ChatService

from .conftest import PASSWORD


def raw(db, sql: str, params: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(db.path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def names(accounts) -> list[str]:
    return [a.name for a in accounts]




# -- register -------------------------------------------------------------------------------

def test_register_stores_the_account(service, db, clock):
    account = service.register("Alice", PASSWORD)
    assert account.name == "Alice"
    assert account.created_at == clock.now()
    assert account.last_login_at == clock.now()
    assert db.read(lambda repo: repo.get(account.id)) == account
    stored_hash = raw(db, "SELECT password_hash FROM accounts")[0][0]
    assert stored_hash.startswith("$argon2id$")
    assert PASSWORD not in stored_hash


@pytest.mark.parametrize(
    "bad_name",
    ["", "a" * 33, "a b", "é", "alice!", "a/b", "alice\n", " alice", "al\u200bice", "ä" * 3],
)
def test_register_rejects_invalid_names(service, db, bad_name):
    with pytest.raises(InvalidName) as err:
        service.register(bad_name, PASSWORD)
    assert err.value.code == "invalid_name"
    assert raw(db, "SELECT COUNT(*) FROM accounts") == [(0,)]


@pytest.mark.parametrize("good_name", ["a", "a" * 32, "A.b-c_9", "___", "..", "-"])
def test_register_accepts_valid_names(service, good_name):
    assert service.register(good_name, PASSWORD).name == good_name


def test_register_normalises_full_width_names(service, db):
    account = service.register("Ａｌｉｃｅ", PASSWORD)  # full-width letters
    assert account.name == "Alice"
    assert raw(db, "SELECT name, name_key FROM accounts") == [("Alice", "alice")]
    with pytest.raises(NameTaken):
        service.register("alice", PASSWORD)
    # and the normalised name logs in under either spelling
    assert service.login("alice", PASSWORD)[0].id == account.id
    assert service.login("ＡＬＩＣＥ", PASSWORD)[0].id == account.id


def test_register_normalisation_that_grows_past_the_limit_is_refused(service):
    # 16 ligatures "ﬀ" are 16 characters but NFKC makes them 32 "f"s: still fine ...
    assert service.register("\ufb00" * 16, PASSWORD).name == "f" * 32
    # ... 17 of them become 34 characters: too long.
    with pytest.raises(InvalidName):
        service.register("\ufb00" * 17, PASSWORD)


@pytest.mark.parametrize("bad_password", ["", "1234567", "ä" * 7, "x" * 1025, "é" * 513])
def test_register_rejects_invalid_passwords(service, db, bad_password):
    with pytest.raises(InvalidPassword) as err:
        service.register("Alice", bad_password)
    assert err.value.code == "invalid_password"
    assert raw(db, "SELECT COUNT(*) FROM accounts") == [(0,)]


@pytest.mark.parametrize("good_password", ["12345678", "ä" * 8, "x" * 1024, "é" * 512])
def test_register_accepts_passwords_at_the_limits(service, good_password):
    account = service.register("Alice", good_password)
    assert service.login("Alice", good_password)[0].id == account.id


def test_name_taken_without_regard_to_case(service, db):
    service.register("Alice", PASSWORD)
    for other in ("alice", "ALICE", "aLiCe"):
        with pytest.raises(NameTaken) as err:
            service.register(other, "another password")
        assert err.value.code == "name_taken"
    assert raw(db, "SELECT name FROM accounts") == [("Alice",)]


def test_concurrent_registrations_of_one_name_give_one_account(service, db):
    results: list[object] = []
    barrier = threading.Barrier(8)

    def register(name):
        barrier.wait()
        try:
            results.append(service.register(name, PASSWORD))
        except ChatError as exc:
            results.append(exc)

    threads = [threading.Thread(target=register, args=(n,))
               for n in ["Alice", "alice", "ALICE", "aLice"] * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    created = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(created) == 1
    assert len(refused) == 7 and all(isinstance(r, NameTaken) for r in refused)
    assert raw(db, "SELECT COUNT(*) FROM accounts") == [(1,)]


# -- login ----------------------------------------------------------------------------------

def test_login_checks_the_password(service, alice):
    account, pending = service.login("Alice", PASSWORD)
    assert account.id == alice.id and account.name == "Alice"
    assert pending == 0
    assert service.login("alice", PASSWORD)[0].id == alice.id  # any case


def test_unknown_name_and_wrong_password_fail_the_same_way(service, alice):
    failures = []
    for name, password in [("Alice", "wrong password"), ("Nobody", PASSWORD),
                           ("", PASSWORD), ("not a name!", PASSWORD), ("Alice", "")]:
        with pytest.raises(InvalidCredentials) as err:
            service.login(name, password)
        failures.append((type(err.value), err.value.code, str(err.value)))
    assert failures[0][1] == "invalid_credentials"
    assert len(set(failures)) == 1, failures


def test_login_reports_pending_and_records_the_time(service, db, clock, alice, bob):
    service.send(bob, "Alice", "one")
    service.send(bob, "Alice", "two")
    created = alice.created_at
    login_time = clock.advance(60_000)
    account, pending = service.login("Alice", PASSWORD)
    assert pending == 2
    assert account.last_login_at == login_time
    assert account.created_at == created
    stored = db.read(lambda repo: repo.get(alice.id))
    assert stored.last_login_at == login_time
    assert stored.created_at == created


def test_failed_login_does_not_touch_last_login(service, db, clock, alice):
    clock.advance(1000)
    with pytest.raises(InvalidCredentials):
        service.login("Alice", "wrong password")
    assert db.read(lambda repo: repo.get(alice.id)).last_login_at == alice.created_at


# -- search ---------------------------------------------------------------------------------

def test_search_pages(service):
    for name in ["carol", "Bob", "alice", "Dave", "bobby", "eve"]:
        service.register(name, PASSWORD)
    page, after = service.search("", "", 2)
    assert (names(page), after) == (["alice", "Bob"], "Bob")
    page, after = service.search("", after, 2)
    assert (names(page), after) == (["bobby", "carol"], "carol")
    page, after = service.search("", after, 2)
    assert (names(page), after) == (["Dave", "eve"], "")  # a full last page: no empty page next
    page, after = service.search("b*", "", 1)
    assert (names(page), after) == (["Bob"], "Bob")
    page, after = service.search("b*", after, 1)
    assert (names(page), after) == (["bobby"], "")


def test_search_limit_is_clamped(service, db):
    with db.unit_of_work() as uow:  # 520 accounts without paying for 520 hashes
        for i in range(520):
            uow.repo.add_account(f"u{i:03d}", f"u{i:03d}", "not-a-hash", 1)
        uow.commit()
    page, after = service.search("", "", 0)
    assert len(page) == domain.DEFAULT_PAGE_SIZE == 50
    assert after == page[-1].name == "u049"
    page, after = service.search("", "", -5)
    assert len(page) == 50
    page, after = service.search("", "", 10_000)
    assert len(page) == domain.MAX_PAGE_SIZE == 500
    assert after == "u499"
    page, after = service.search("", after, 10_000)
    assert names(page) == [f"u{i}" for i in range(500, 520)]
    assert after == ""


def test_search_pattern_length(service, alice):
    assert names(service.search("*" * 64, "", 10)[0]) == ["Alice"]
    with pytest.raises(InvalidPattern) as err:
        service.search("*" * 65, "", 10)
    assert err.value.code == "invalid_pattern"


def test_search_wildcards_through_the_service(service, alice, bob):
    service.register("al_x", PASSWORD)
    assert names(service.search("AL*", "", 10)[0]) == ["al_x", "Alice"]
    assert names(service.search("al_*", "", 10)[0]) == ["al_x"]
    assert names(service.search("?ob", "", 10)[0]) == ["Bob"]
    assert names(service.search("%", "", 10)[0]) == []
    assert names(service.search("*_*", "", 10)[0]) == ["al_x"]  # no prefix range to help
    assert names(service.search("*%*", "", 10)[0]) == []


@pytest.mark.parametrize("pattern", ["\U0010ffff*", "a\U0010ffff", "\U0010ffff", "\ud7ff*"])
def test_search_with_the_highest_code_point_finds_nothing(service, alice, pattern):
    # Valid UTF-8 a client can send. Names are ASCII, so nothing can match; the search must
    # say so, not crash (the prefix range's upper bound is the next code point: past U+10FFFF
    # there is none, and after U+D7FF comes a surrogate, which cannot be bound as UTF-8).
    assert service.search(pattern, "", 10) == ([], "")


# -- send -----------------------------------------------------------------------------------

def test_send_stores_a_message(service, db, clock, alice, bob):
    clock.advance(5)
    outcome = service.send(alice, "bob", "hello")  # recipient in any case
    assert outcome.duplicate is False
    assert outcome.recipient_id == bob.id
    assert outcome.message.id == outcome.message_id
    assert outcome.message.sender == "Alice"
    assert outcome.message.sent_at == clock.now()
    messages, remaining = service.fetch(bob, 0)
    assert [(m.id, m.sender, m.body, m.sent_at) for m in messages] == [
        (outcome.message_id, "Alice", "hello", clock.now())]
    assert remaining == 0


def test_send_to_a_full_width_name(service, alice, bob):
    assert service.send(alice, "ｂｏｂ", "hi").recipient_id == bob.id


@pytest.mark.parametrize("to", ["Nobody", "", "not a name!", "x" * 40])
def test_send_to_unknown_account(service, db, alice, to):
    with pytest.raises(NoSuchAccount) as err:
        service.send(alice, to, "hello")
    assert err.value.code == "no_such_account"
    assert raw(db, "SELECT COUNT(*) FROM messages") == [(0,)]


def test_send_empty_message(service, db, alice, bob):
    with pytest.raises(EmptyMessage) as err:
        service.send(alice, "Bob", "")
    assert err.value.code == "empty_message"
    assert raw(db, "SELECT COUNT(*) FROM messages") == [(0,)]


def test_message_size_limit_counts_utf8_bytes(service, db, alice, bob):
    limit = domain.MAX_MESSAGE_BYTES
    assert service.max_message_bytes == limit
    assert service.send(alice, "Bob", "x" * limit).duplicate is False
    assert service.send(alice, "Bob", "é" * (limit // 2)).duplicate is False  # 2 bytes each
    for too_big in ["x" * (limit + 1), "é" * (limit // 2) + "x", "€" * (limit // 3 + 1)]:
        with pytest.raises(MessageTooLarge) as err:
            service.send(alice, "Bob", too_big)
        assert err.value.code == "message_too_large"
    stored = [len(m.body.encode()) for m in service.fetch(bob, 0)[0]]
    assert stored == [limit, limit]


def test_message_size_limit_is_the_service_setting(db, writer, hasher, clock):
    small = ChatService(db, writer, hasher, clock=clock.now, max_message_bytes=10)
    alice = small.register("Alice", PASSWORD)
    small.register("Bob", PASSWORD)
    small.send(alice, "Bob", "€€€x")  # 3 + 3 + 3 + 1 = 10 bytes
    with pytest.raises(MessageTooLarge):
        small.send(alice, "Bob", "€€€é")  # 11 bytes in 4 characters


def test_client_msg_id_length(service, alice, bob):
    service.send(alice, "Bob", "ok", client_msg_id="x" * 64)
    with pytest.raises(InvalidRequest) as err:
        service.send(alice, "Bob", "too long", client_msg_id="é" * 33)  # 66 bytes
    assert err.value.code == "invalid_request"


def test_idempotent_send(service, db, clock, alice, bob):
    first = service.send(alice, "Bob", "hello", client_msg_id="m-1")
    clock.advance(1000)
    again = service.send(alice, "Bob", "hello", client_msg_id="m-1")
    assert first.duplicate is False
    assert again.duplicate is True
    assert again.message_id == first.message_id
    assert raw(db, "SELECT COUNT(*) FROM messages") == [(1,)]

    # The same id from another sender is another message.
    other = service.send(bob, "Alice", "hello", client_msg_id="m-1")
    assert other.duplicate is False and other.message_id != first.message_id

    # After the recipient acknowledged it, a retry still stores nothing new.
    assert service.ack(bob, [first.message_id]) == 1
    late = service.send(alice, "Bob", "hello", client_msg_id="m-1")
    assert (late.duplicate, late.message_id) == (True, first.message_id)
    assert service.fetch(bob, 0) == ([], 0)


def test_a_retry_over_the_rate_gets_its_original_reply(db, writer, hasher, clock):
    """A client whose reply was lost retries with the same client_msg_id; if the account is
    over its send rate by then, the retry must still get the original message id (as a
    duplicate), not rate_limited: it would retry that forever. A new send is refused."""
    limited = ChatService(db, writer, hasher, clock=clock.now,
                          send_limiter=RateLimiter(0.001, 2, clock=lambda: 0.0))
    alice = limited.register("Alice", PASSWORD)
    bob = limited.register("Bob", PASSWORD)
    first = limited.send(alice, "Bob", "one", client_msg_id="m-1")
    limited.send(alice, "Bob", "two")  # the burst of 2 is used up
    again = limited.send(alice, "Bob", "one", client_msg_id="m-1")
    assert (again.duplicate, again.message_id) == (True, first.message_id)
    with pytest.raises(RateLimited) as refused:
        limited.send(alice, "Bob", "three", client_msg_id="m-3")  # not a retry
    assert refused.value.retry_after_ms > 0
    with pytest.raises(RateLimited):
        limited.send(alice, "Bob", "four")  # no client_msg_id: refused at once
    assert [m.body for m in limited.fetch(bob, 0)[0]] == ["one", "two"]
    assert raw(db, "SELECT COUNT(*) FROM send_receipts") == [(1,)]  # m-1's alone


def test_a_retry_over_the_rate_queued_behind_its_original_is_a_duplicate(
        db, writer, hasher, clock):
    """The original and its retry submitted back to back (the retry over the rate): the
    writer checks the retry after the original, whichever commit holds them."""
    limited = ChatService(db, writer, hasher, clock=clock.now,
                          send_limiter=RateLimiter(0.001, 1, clock=lambda: 0.0))
    alice = limited.register("Alice", PASSWORD)
    limited.register("Bob", PASSWORD)
    original = limited.submit_send(alice, "Bob", "one", client_msg_id="m-1")
    retry = limited.submit_send(alice, "Bob", "one", client_msg_id="m-1")
    first, again = original.result(30), retry.result(30)
    assert (first.duplicate, again.duplicate) == (False, True)
    assert again.message_id == first.message_id
    assert raw(db, "SELECT COUNT(*) FROM messages") == [(1,)]


def test_concurrent_retries_store_one_message(service, db, alice, bob):
    outcomes = []
    barrier = threading.Barrier(10)

    def send():
        barrier.wait()
        outcomes.append(service.send(alice, "Bob", "once", client_msg_id="retry"))

    threads = [threading.Thread(target=send) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(outcomes) == 10
    assert len({o.message_id for o in outcomes}) == 1
    assert sorted(o.duplicate for o in outcomes) == [False] + [True] * 9
    assert raw(db, "SELECT COUNT(*) FROM messages") == [(1,)]


def test_send_from_a_deleted_account_is_refused(service, db, alice, bob):
    service.delete_account(alice, PASSWORD)
    with pytest.raises(InvalidCredentials):
        service.send(alice, "Bob", "from beyond")
    assert raw(db, "SELECT COUNT(*) FROM messages") == [(0,)]


# -- fetch and ack --------------------------------------------------------------------------

def test_fetch_limit_and_remaining(service, alice, bob):
    ids = [service.send(alice, "Bob", f"m{i}").message_id for i in range(5)]
    messages, remaining = service.fetch(bob, 2)
    assert [m.id for m in messages] == ids[:2]
    assert remaining == 3
    messages, remaining = service.fetch(bob, 0)  # 0 = default 100
    assert [m.body for m in messages] == [f"m{i}" for i in range(5)]
    assert remaining == 0
    # Fetching is not delivering: the same messages come again.
    assert [m.id for m in service.fetch(bob, 10)[0]] == ids
    assert service.pending(bob.id) == 5


def test_fetch_limit_is_clamped(service, db, alice, bob):
    with db.unit_of_work() as uow:
        for i in range(1005):
            uow.repo.add_message(alice, bob.id, f"m{i}", 1)
        uow.commit()
    messages, remaining = service.fetch(bob, 0)
    assert (len(messages), remaining) == (domain.DEFAULT_FETCH_LIMIT, 905)
    messages, remaining = service.fetch(bob, 5000)
    assert (len(messages), remaining) == (domain.MAX_FETCH_LIMIT, 5)
    assert messages[0].body == "m0" and messages[-1].body == "m999"


def test_ack_counts_and_ignores_foreign_ids(service, alice, bob):
    carol = service.register("Carol", PASSWORD)
    to_bob = [service.send(alice, "Bob", f"b{i}").message_id for i in range(3)]
    to_carol = service.send(alice, "Carol", "c").message_id

    assert service.ack(bob, [to_carol]) == 0
    assert service.ack(bob, [to_bob[0], to_bob[0], to_carol, 10**9]) == 1
    assert service.ack(bob, [to_bob[0]]) == 0  # already acknowledged
    assert service.ack(bob, []) == 0
    assert [m.id for m in service.fetch(bob, 0)[0]] == to_bob[1:]
    assert [m.id for m in service.fetch(carol, 0)[0]] == [to_carol]


def test_ack_keeps_messages_stored_after_the_fetch(service, alice, bob):
    service.send(alice, "Bob", "early")
    fetched, _ = service.fetch(bob, 0)
    late = service.send(alice, "Bob", "late").message_id
    assert service.ack(bob, [m.id for m in fetched]) == 1
    assert [m.id for m in service.fetch(bob, 0)[0]] == [late]


def test_ack_too_many_ids(service, alice, bob):
    mid = service.send(alice, "Bob", "x").message_id
    with pytest.raises(InvalidRequest):
        service.ack(bob, list(range(10**6, 10**6 + domain.MAX_ACK_IDS)) + [mid])
    assert service.pending(bob.id) == 1
    # Duplicates are counted once: 1000 distinct ids plus repeats is still allowed.
    assert service.ack(bob, [mid] * 5 + list(range(10**6, 10**6 + 999))) == 1


# -- delete account -------------------------------------------------------------------------

def test_delete_account_with_wrong_password_deletes_nothing(service, db, alice, bob):
    service.send(bob, "Alice", "for alice")
    with pytest.raises(InvalidCredentials) as err:
        service.delete_account(alice, "wrong password")
    assert err.value.code == "invalid_credentials"
    account, pending = service.login("Alice", PASSWORD)
    assert (account.id, pending) == (alice.id, 1)
    assert [m.body for m in service.fetch(alice, 0)[0]] == ["for alice"]


def test_delete_account_and_reuse_the_name(service, db, alice, bob):
    service.send(bob, "Alice", "for the old alice 1")
    service.send(bob, "Alice", "for the old alice 2", client_msg_id="b-1")
    sent = service.send(alice, "Bob", "from the old alice", client_msg_id="a-1").message_id

    assert service.delete_account(alice, PASSWORD) == 2

    with pytest.raises(InvalidCredentials):
        service.login("Alice", PASSWORD)
    with pytest.raises(NoSuchAccount):
        service.send(bob, "alice", "nobody home")

    new_alice = service.register("alice", "another password")
    assert new_alice.id > alice.id
    assert service.login("alice", "another password")[1] == 0
    assert service.fetch(new_alice, 0) == ([], 0)
    # A retry of a send addressed to the old account must not reach the new one either.
    retry = service.send(bob, "Alice", "for the old alice 2", client_msg_id="b-1")
    assert retry.duplicate is True
    assert service.fetch(new_alice, 0) == ([], 0)
    # The new owner's sends are new messages, even with the old owner's client_msg_id.
    fresh = service.send(new_alice, "Bob", "from the new alice", client_msg_id="a-1")
    assert fresh.duplicate is False

    # What the old account sent is still fetchable by its recipient, under the old name.
    messages, _ = service.fetch(bob, 0)
    assert [(m.id, m.sender, m.body) for m in messages] == [
        (sent, "Alice", "from the old alice"),
        (fresh.message_id, "alice", "from the new alice"),
    ]
    assert service.ack(bob, [sent]) == 1
