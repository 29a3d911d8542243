"""The Repository on a real SQLite file, through Database.unit_of_work() and Database.read()."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import create_engine

from chatserver.domain import Account, SearchPattern, StoredMessage, name_key
from chatserver.errors import NameTaken
from chatserver.storage.database import Database
from chatserver.storage.repository import Repository

# -- helpers --------------------------------------------------------------------------------

def add_account(db: Database, name: str, now: int = 1_000) -> Account:
    with db.unit_of_work() as uow:
        account = uow.repo.add_account(name, name_key(name), f"hash-of-{name}", now)
        uow.commit()
    return account


def add_message(db: Database, sender: Account, recipient: Account, body: str,
                now: int = 2_000, client_msg_id: str = "") -> int:
    with db.unit_of_work() as uow:
        message_id = uow.repo.add_message(sender, recipient.id, body, now, client_msg_id)
        uow.commit()
    return message_id


def raw(db: Database, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows as another process would see them: a plain sqlite3 connection of its own."""
    conn = sqlite3.connect(db.path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def search(db: Database, pattern: str, after: str = "", limit: int = 100) -> list[str]:
    compiled = SearchPattern.parse(pattern)
    return [a.name for a in db.read(lambda repo: repo.search(compiled, after, limit))]


def bodies(db: Database, recipient: Account, limit: int = 100) -> list[str]:
    return [m.body for m in db.read(lambda repo: repo.undelivered(recipient.id, limit))]


# -- accounts -------------------------------------------------------------------------------

def test_add_then_get_account(db):
    alice = add_account(db, "Alice", now=1234)
    assert alice == Account(id=alice.id, name="Alice", created_at=1234, last_login_at=1234)

    assert db.read(lambda repo: repo.get(alice.id)) == alice
    assert db.read(lambda repo: repo.get_by_key("alice")) == (alice, "hash-of-Alice")
    assert db.read(lambda repo: repo.account_id_by_key("alice")) == alice.id
    assert db.read(lambda repo: repo.password_hash(alice.id)) == "hash-of-Alice"
    # The key is the lookup, not the display name.
    assert db.read(lambda repo: repo.get_by_key("Alice")) is None
    assert db.read(lambda repo: repo.get(alice.id + 1000)) is None
    assert raw(db, "SELECT name, name_key FROM accounts") == [("Alice", "alice")]


def test_set_password_hash_and_record_login(db):
    alice = add_account(db, "Alice", now=1000)
    with db.unit_of_work() as uow:
        uow.repo.set_password_hash(alice.id, "new-hash")
        uow.repo.record_login(alice.id, 5000)
        uow.commit()
    account, stored_hash = db.read(lambda repo: repo.get_by_key("alice"))
    assert stored_hash == "new-hash"
    assert account.last_login_at == 5000
    assert account.created_at == 1000


def test_a_reset_counts_in_password_version_and_a_rehash_does_not(db):
    alice = add_account(db, "Alice")
    bob = add_account(db, "Bob")
    assert db.read(lambda repo: repo.get_by_key("alice"))[0].password_version == 0
    with db.unit_of_work() as uow:
        uow.repo.set_password_hash(alice.id, "rehashed")  # same password, new cost
        uow.commit()
    assert db.read(lambda repo: repo.password_versions([alice.id, bob.id])) == {
        alice.id: 0, bob.id: 0}
    for new_hash in ("reset-1", "reset-2"):
        with db.unit_of_work() as uow:
            uow.repo.reset_password_hash(alice.id, new_hash)
            uow.commit()
    account, stored_hash = db.read(lambda repo: repo.get_by_key("alice"))
    assert (account.password_version, stored_hash) == (2, "reset-2")
    # a deleted (or never existing) id is absent
    assert db.read(lambda repo: repo.password_versions([alice.id, bob.id, 999])) == {
        alice.id: 2, bob.id: 0}
    assert db.read(lambda repo: repo.password_versions([])) == {}


def test_messages_by_ids_returns_the_undelivered_ones_in_id_order(db):
    alice, bob = add_account(db, "Alice"), add_account(db, "Bob")
    ids = [add_message(db, alice, bob, f"m{i}", now=5000 + i) for i in range(3)]
    with db.unit_of_work() as uow:
        assert uow.repo.delete_messages(bob.id, [ids[1]]) == 1
        uow.commit()
    found = db.read(lambda repo: repo.messages_by_ids([ids[2], ids[1], ids[0], 10**9]))
    assert [(m.id, m.sender, m.recipient_id, m.sent_at, m.body) for m in found] == [
        (ids[0], "Alice", bob.id, 5000, "m0"), (ids[2], "Alice", bob.id, 5002, "m2")]
    assert db.read(lambda repo: repo.messages_by_ids([])) == []


def test_undelivered_after_gives_the_recipients_newer_undelivered_messages(db):
    alice, bob, carol = (add_account(db, n) for n in ("Alice", "Bob", "Carol"))
    to_bob = [add_message(db, alice, bob, f"b{i}", now=100 + i) for i in range(4)]
    to_carol = [add_message(db, alice, carol, f"c{i}", now=200 + i) for i in range(2)]
    to_alice = add_message(db, bob, alice, "a0", now=300)
    with db.unit_of_work() as uow:
        assert uow.repo.delete_messages(bob.id, [to_bob[2]]) == 1  # acknowledged
        uow.commit()

    def after(recipients, after_id, limit=100):
        return [m.id for m in db.read(
            lambda repo: repo.undelivered_after(recipients, after_id, limit))]

    assert after([bob.id, carol.id], to_bob[0]) == [to_bob[1], to_bob[3]] + to_carol
    assert after([bob.id, carol.id], to_bob[0], limit=2) == [to_bob[1], to_bob[3]]
    assert after([carol.id, carol.id], 0) == to_carol
    assert after([alice.id], to_alice) == []
    assert after([], 0) == []
    found = db.read(lambda repo: repo.undelivered_after([bob.id], to_bob[2], 10))
    assert [(m.id, m.sender, m.recipient_id, m.sent_at, m.body) for m in found] == [
        (to_bob[3], "Alice", bob.id, 103, "b3")]


def test_name_is_unique_by_key(db):
    add_account(db, "Alice")
    with pytest.raises(NameTaken) as err:
        add_account(db, "alice")
    assert err.value.code == "name_taken"
    with pytest.raises(NameTaken):
        add_account(db, "ALICE")
    assert raw(db, "SELECT name FROM accounts") == [("Alice",)]


def test_unit_of_work_stays_usable_after_name_taken(db):
    add_account(db, "Alice")
    with db.unit_of_work() as uow:
        with pytest.raises(NameTaken):
            uow.repo.add_account("alice", "alice", "h", 1)
        uow.repo.add_account("Bob", "bob", "h", 1)
        uow.commit()
    assert raw(db, "SELECT name FROM accounts ORDER BY id") == [("Alice",), ("Bob",)]


def test_unit_of_work_without_commit_rolls_back(db):
    with db.unit_of_work() as uow:
        uow.repo.add_account("Ghost", "ghost", "h", 1)
        # Visible inside its own transaction ...
        assert uow.repo.account_id_by_key("ghost") is not None
    # ... and gone once the unit of work ends without commit().
    assert db.read(lambda repo: repo.account_id_by_key("ghost")) is None
    assert raw(db, "SELECT COUNT(*) FROM accounts") == [(0,)]


def test_unit_of_work_rolls_back_on_exception(db):
    with pytest.raises(RuntimeError, match="boom"):
        with db.unit_of_work() as uow:
            uow.repo.add_account("Ghost", "ghost", "h", 1)
            raise RuntimeError("boom")
    assert raw(db, "SELECT COUNT(*) FROM accounts") == [(0,)]


def test_commit_is_visible_to_another_connection(db):
    add_account(db, "Alice")
    assert raw(db, "SELECT name FROM accounts") == [("Alice",)]


def test_read_sees_one_snapshot_while_a_writer_commits(db):
    add_account(db, "Alice")

    def read_twice(repo):
        before = repo.account_id_by_key("bob")
        add_account(db, "Bob")  # another connection commits while this read is open
        after = repo.account_id_by_key("bob")
        return before, after

    assert db.read(read_twice) == (None, None)
    assert db.read(lambda repo: repo.account_id_by_key("bob")) is not None


# -- search ---------------------------------------------------------------------------------

# Registered in this order; key order is ab, abc, abd, ac, b (not the binary order of names).
SEARCH_NAMES = ["b", "Ac", "abd", "ABC", "ab"]
ALL_BY_KEY = ["ab", "ABC", "abd", "Ac", "b"]


@pytest.fixture
def named_db(db):
    for name in SEARCH_NAMES:
        add_account(db, name)
    return db


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("ab*", ["ab", "ABC", "abd"]),
        ("AB*", ["ab", "ABC", "abd"]),
        ("*b*", ["ab", "ABC", "abd", "b"]),
        ("*B*", ["ab", "ABC", "abd", "b"]),
        ("a?", ["ab", "Ac"]),
        ("?", ["b"]),
        ("??", ["ab", "Ac"]),
        ("ab?", ["ABC", "abd"]),
        ("*c", ["ABC", "Ac"]),
        ("a*d", ["abd"]),
        ("abc", ["ABC"]),
        ("ac*", ["Ac"]),
        ("b*", ["b"]),
        ("*", ALL_BY_KEY),
        ("**", ALL_BY_KEY),
        ("", ALL_BY_KEY),
        ("x*", []),
        ("abcd", []),
        ("ａｂ*", ["ab", "ABC", "abd"]),  # full-width letters are NFKC-normalised like names
    ],
)
def test_search_wildcards(named_db, pattern, expected):
    assert search(named_db, pattern) == expected


def test_search_returns_names_as_registered_sorted_by_key(named_db):
    found = named_db.read(lambda repo: repo.search(SearchPattern.parse(""), "", 100))
    assert [a.name for a in found] == ALL_BY_KEY
    assert all(isinstance(a, Account) for a in found)


def test_search_percent_underscore_and_backslash_are_literal(db):
    for name in ["a_b", "axb", "a.b", "a-b", "_x", "abb"]:
        add_account(db, name)
    assert search(db, "a_b") == ["a_b"]
    assert search(db, "a_*") == ["a_b"]
    assert search(db, "_*") == ["_x"]
    assert search(db, "*_*") == ["_x", "a_b"]
    assert search(db, "%") == []
    assert search(db, "a%b") == []
    assert search(db, "*%*") == []
    assert search(db, "a\\b") == []
    assert search(db, "a\\*") == []
    # ? is the one-character wildcard; '-' < '.' < '_' < 'b' < 'x' in key order.
    assert search(db, "a?b") == ["a-b", "a.b", "a_b", "abb", "axb"]


def test_search_limit_and_after_pagination(named_db):
    assert search(named_db, "", limit=2) == ["ab", "ABC"]
    assert search(named_db, "", after="ABC", limit=2) == ["abd", "Ac"]
    assert search(named_db, "", after="abc", limit=2) == ["abd", "Ac"]  # after is case-blind
    assert search(named_db, "", after="Ac", limit=2) == ["b"]
    assert search(named_db, "", after="b", limit=2) == []
    assert search(named_db, "ab*", after="ab", limit=10) == ["ABC", "abd"]
    # An `after` that is no account's name still pages by key.
    assert search(named_db, "", after="abcc", limit=10) == ["abd", "Ac", "b"]


def test_search_pages_cover_everything_exactly_once(db):
    names = [f"user{i:03d}" for i in range(37)] + ["User_x", "uSer-y"]
    for name in names:
        add_account(db, name)
    seen: list[str] = []
    after = ""
    while True:
        page = search(db, "u*", after=after, limit=5)
        if not page:
            break
        seen += page
        after = page[-1]
    assert sorted(seen, key=str.casefold) == seen
    assert sorted(seen) == sorted(names)


def test_search_prefix_range_does_not_leak_neighbours(db):
    for name in ["a", "ab", "ab-", "ab.", "ab0", "abz", "ab_", "ac", "aa", "b"]:
        add_account(db, name)
    assert search(db, "ab*") == ["ab", "ab-", "ab.", "ab0", "ab_", "abz"]
    assert search(db, "ab?") == ["ab-", "ab.", "ab0", "ab_", "abz"]
    assert search(db, "a*") == ["a", "aa", "ab", "ab-", "ab.", "ab0", "ab_", "abz", "ac"]


# -- messages -------------------------------------------------------------------------------

@pytest.fixture
def people(db):
    return {name: add_account(db, name) for name in ("Alice", "Bob", "Carol")}


def test_undelivered_oldest_first(db, people):
    alice, bob, carol = people["Alice"], people["Bob"], people["Carol"]
    ids = [
        add_message(db, alice, bob, "m0", now=5000),
        add_message(db, carol, bob, "m1", now=5000),  # same millisecond: id decides
        add_message(db, alice, bob, "m2", now=5001),
        add_message(db, alice, carol, "for carol", now=5002),
        add_message(db, carol, bob, "m3", now=5003),
    ]
    assert ids == sorted(ids)
    found = db.read(lambda repo: repo.undelivered(bob.id, 100))
    assert found == [
        StoredMessage(ids[0], "Alice", bob.id, 5000, "m0"),
        StoredMessage(ids[1], "Carol", bob.id, 5000, "m1"),
        StoredMessage(ids[2], "Alice", bob.id, 5001, "m2"),
        StoredMessage(ids[4], "Carol", bob.id, 5003, "m3"),
    ]
    assert bodies(db, bob, limit=2) == ["m0", "m1"]
    assert bodies(db, carol) == ["for carol"]
    assert bodies(db, alice) == []
    assert db.read(lambda repo: repo.count_undelivered(bob.id)) == 4
    assert db.read(lambda repo: repo.count_undelivered(carol.id)) == 1
    assert db.read(lambda repo: repo.count_undelivered(alice.id)) == 0


def test_message_body_round_trips_unicode(db, people):
    body = "héllo ☺ \U0001F600 \x00 end"
    add_message(db, people["Alice"], people["Bob"], body)
    assert bodies(db, people["Bob"]) == [body]


def test_ack_deletes_only_the_fetched_ids(db, people):
    alice, bob = people["Alice"], people["Bob"]
    add_message(db, alice, bob, "one")
    add_message(db, alice, bob, "two")
    fetched = db.read(lambda repo: repo.undelivered(bob.id, 100))
    late = add_message(db, alice, bob, "stored after the fetch")

    with db.unit_of_work() as uow:
        assert uow.repo.delete_messages(bob.id, [m.id for m in fetched]) == 2
        uow.commit()

    remaining = db.read(lambda repo: repo.undelivered(bob.id, 100))
    assert [(m.id, m.body) for m in remaining] == [(late, "stored after the fetch")]


def test_delete_messages_ignores_ids_of_another_recipient(db, people):
    alice, bob, carol = people["Alice"], people["Bob"], people["Carol"]
    for_bob = add_message(db, alice, bob, "for bob")
    for_carol = add_message(db, alice, carol, "for carol")

    with db.unit_of_work() as uow:
        assert uow.repo.delete_messages(bob.id, [for_carol]) == 0
        assert uow.repo.delete_messages(bob.id, [for_carol, for_bob, 999_999]) == 1
        assert uow.repo.delete_messages(bob.id, [for_bob]) == 0  # already gone
        assert uow.repo.delete_messages(bob.id, []) == 0
        uow.commit()
    assert bodies(db, carol) == ["for carol"]
    assert bodies(db, bob) == []


@pytest.mark.parametrize("count", [127, 128, 129, 1000])
def test_delete_messages_of_a_long_ack(db, people, count):
    # Long acks are deleted in IN lists of up to 128 ids: every chunk counts, and each one
    # deletes only this recipient's ids.
    alice, bob, carol = people["Alice"], people["Bob"], people["Carol"]
    with db.unit_of_work() as uow:
        for_bob = [uow.repo.add_message(alice, bob.id, f"b{i}", 1, "") for i in range(count)]
        for_carol = [uow.repo.add_message(alice, carol.id, f"c{i}", 1, "") for i in range(9)]
        uow.commit()
    kept = for_bob[5::7]
    acked = [i for i in for_bob if i not in kept]
    listed = acked + for_carol + [999_999]
    listed[::3] = reversed(listed[::3])  # any order
    with db.unit_of_work() as uow:
        assert uow.repo.delete_messages(bob.id, listed) == len(acked)
        uow.commit()
    assert [m.id for m in db.read(lambda repo: repo.undelivered(bob.id, 1000))] == kept
    assert len(bodies(db, carol)) == 9


def test_delete_messages_without_commit_keeps_them(db, people):
    mid = add_message(db, people["Alice"], people["Bob"], "kept")
    with db.unit_of_work() as uow:
        assert uow.repo.delete_messages(people["Bob"].id, [mid]) == 1
    assert bodies(db, people["Bob"]) == ["kept"]


def test_receipts(db, people):
    alice, bob = people["Alice"], people["Bob"]
    mid = add_message(db, alice, bob, "hi", now=7000, client_msg_id="c-1")
    plain = add_message(db, alice, bob, "no receipt")
    assert db.read(lambda repo: repo.receipt(alice.id, "c-1")) == mid
    assert db.read(lambda repo: repo.receipt(bob.id, "c-1")) is None
    assert db.read(lambda repo: repo.receipt(alice.id, "c-2")) is None
    assert raw(db, "SELECT COUNT(*) FROM send_receipts") == [(1,)]
    # The receipt outlives the message's acknowledgement.
    with db.unit_of_work() as uow:
        uow.repo.delete_messages(bob.id, [mid, plain])
        uow.commit()
    assert db.read(lambda repo: repo.receipt(alice.id, "c-1")) == mid


# -- deleting accounts ----------------------------------------------------------------------

def test_delete_account_drops_incoming_keeps_sent(db, people):
    alice, bob, carol = people["Alice"], people["Bob"], people["Carol"]
    sent1 = add_message(db, alice, bob, "from alice 1", client_msg_id="a1")
    sent2 = add_message(db, alice, bob, "from alice 2")
    add_message(db, bob, alice, "to alice 1")
    add_message(db, carol, alice, "to alice 2")
    add_message(db, carol, bob, "carol to bob")

    with db.unit_of_work() as uow:
        assert uow.repo.delete_account(alice.id) == 2
        uow.commit()

    assert db.read(lambda repo: repo.get(alice.id)) is None
    assert db.read(lambda repo: repo.account_id_by_key("alice")) is None
    assert raw(db, "SELECT COUNT(*) FROM messages WHERE recipient_id = ?", (alice.id,)) == [(0,)]
    assert raw(db, "SELECT COUNT(*) FROM send_receipts WHERE sender_id = ?", (alice.id,)) == [(0,)]
    # What Alice sent stays deliverable, under her name; it keeps her (now unused) id.
    found = db.read(lambda repo: repo.undelivered(bob.id, 100))
    assert [(m.id, m.sender, m.body) for m in found[:2]] == [
        (sent1, "Alice", "from alice 1"),
        (sent2, "Alice", "from alice 2"),
    ]
    assert [m.body for m in found] == ["from alice 1", "from alice 2", "carol to bob"]
    assert raw(db, "SELECT sender_id, sender_name FROM messages WHERE id IN (?, ?)",
               (sent1, sent2)) == [(alice.id, "Alice"), (alice.id, "Alice")]
    # Nothing else was touched.
    assert bodies(db, carol) == []
    assert db.read(lambda repo: repo.get(bob.id)) == bob
    assert raw(db, "PRAGMA foreign_key_check") == []


def test_delete_account_with_foreign_keys_off_gives_the_same_result(db, people):
    """The repository deletes explicitly, so a process with foreign_keys=OFF (SQLite's
    default, e.g. a plain engine) leaves no orphan rows."""
    alice, bob = people["Alice"], people["Bob"]
    sent = add_message(db, alice, bob, "from alice")
    add_message(db, bob, alice, "to alice")
    plain = create_engine(db.url)  # no pragmas: foreign keys are off
    try:
        with plain.begin() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 0
            assert Repository(conn).delete_account(alice.id) == 1
    finally:
        plain.dispose()
    assert raw(db, "SELECT sender_id, sender_name FROM messages WHERE id = ?", (sent,)) == [
        (alice.id, "Alice")]
    assert raw(db, "SELECT COUNT(*) FROM messages WHERE recipient_id = ?", (alice.id,)) == [(0,)]
    assert raw(db, "PRAGMA foreign_key_check") == []


def test_new_account_with_a_deleted_name_sees_nothing_of_the_old(db, people):
    alice, bob = people["Alice"], people["Bob"]
    add_message(db, bob, alice, "for the old alice")
    with db.unit_of_work() as uow:
        uow.repo.delete_account(alice.id)
        uow.commit()
    new_alice = add_account(db, "alice")
    assert new_alice.id != alice.id
    assert bodies(db, new_alice) == []
    assert db.read(lambda repo: repo.count_undelivered(new_alice.id)) == 0


# -- ids are never reused -------------------------------------------------------------------

def test_account_ids_not_reused_after_deleting_the_highest(db):
    a, b, c = (add_account(db, n) for n in ("a", "b", "c"))
    assert a.id < b.id < c.id
    with db.unit_of_work() as uow:
        uow.repo.delete_account(c.id)
        uow.commit()
    d = add_account(db, "d")
    assert d.id > c.id
    with db.unit_of_work() as uow:
        for account in (a, b, d):
            uow.repo.delete_account(account.id)
        uow.commit()
    e = add_account(db, "c")  # the very same name as the first deleted one
    assert e.id > d.id


def test_message_ids_not_reused_after_deleting_the_highest(db, people):
    alice, bob = people["Alice"], people["Bob"]
    ids = [add_message(db, alice, bob, f"m{i}") for i in range(3)]
    with db.unit_of_work() as uow:
        uow.repo.delete_messages(bob.id, [ids[-1]])
        uow.commit()
    newer = add_message(db, alice, bob, "m3")
    assert newer > ids[-1]
    with db.unit_of_work() as uow:
        uow.repo.delete_messages(bob.id, ids[:-1] + [newer])
        uow.commit()
    assert raw(db, "SELECT COUNT(*) FROM messages") == [(0,)]
    assert add_message(db, alice, bob, "m4") > newer


def test_message_ids_not_reused_after_recipient_deleted(db, people):
    alice, bob, carol = people["Alice"], people["Bob"], people["Carol"]
    last = add_message(db, alice, bob, "x")
    with db.unit_of_work() as uow:
        uow.repo.delete_account(bob.id)  # its incoming messages, the highest id, go with it
        uow.commit()
    assert add_message(db, alice, carol, "y") > last


# -- administration -------------------------------------------------------------------------

def test_account_summaries_counts(db, people):
    alice, bob, carol = people["Alice"], people["Bob"], people["Carol"]
    add_message(db, alice, bob, "1")
    add_message(db, carol, bob, "2")
    add_message(db, bob, carol, "3")
    everyone = db.read(lambda repo: repo.account_summaries(SearchPattern.parse("")))
    assert [(a.name, n) for a, n in everyone] == [("Alice", 0), ("Bob", 2), ("Carol", 1)]
    assert everyone[0][0] == alice
    only_b = db.read(lambda repo: repo.account_summaries(SearchPattern.parse("B*")))
    assert [(a.name, n) for a, n in only_b] == [("Bob", 2)]
    first_two = db.read(lambda repo: repo.account_summaries(SearchPattern.parse("*"), limit=2))
    assert [(a.name, n) for a, n in first_two] == [("Alice", 0), ("Bob", 2)]
    assert db.read(lambda repo: repo.account_summaries(SearchPattern.parse("%"))) == []
