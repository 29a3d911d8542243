"""What PostgreSQL adds to the storage contract: its collation, its text type, other processes.

The shared contract (accounts, search, messages, ids) runs here through
test_repository_contract.py and test_service_contract.py. These tests cover what only
PostgreSQL can get wrong: a linguistic default collation, text that cannot hold U+0000,
REPEATABLE READ reads, and two servers (two Database objects) writing at the same time, which
SQLite's single write lock rules out.
"""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import text

from chatserver.domain import Account, NewMessage, SearchPattern, SendOutcome, name_key
from chatserver.errors import InvalidCredentials, NameTaken, NoSuchAccount, QueueFull
from chatserver.service import ChatService
from chatserver.storage.database import Database
from chatserver.storage.writer import GroupCommitWriter
from tests.postgres.conftest import raw

PASSWORD = "correct horse"


def add_account(db: Database, name: str) -> Account:
    with db.unit_of_work() as uow:
        account = uow.repo.add_account(name, name_key(name), f"hash-of-{name}", 1_000)
        uow.commit()
    return account


def new_message(sender: Account, to: str, body: str, client_msg_id: str = "",
                sent_at: int = 5_000) -> NewMessage:
    return NewMessage(sender, name_key(to), to, body, sent_at, client_msg_id)


def store(db: Database, batch: list[NewMessage], cap: int = 0) -> list:
    with db.unit_of_work() as uow:
        outcomes = uow.repo.store_messages(batch, cap)
        uow.commit()
    return outcomes


def search(db: Database, pattern: str, after: str = "", limit: int = 100) -> list[str]:
    compiled = SearchPattern.parse(pattern)
    return [a.name for a in db.read(lambda repo: repo.search(compiled, after, limit))]


# -- collation ------------------------------------------------------------------------------

def test_name_keys_collate_by_code_point_whatever_the_database_default(db):
    assert raw(db, "SELECT collation_name FROM information_schema.columns "
                   "WHERE table_schema = current_schema() AND table_name = 'accounts' "
                   "AND column_name = 'name_key'") == [("C",)]
    # The fixture's databases sort linguistically (ICU en-US) when the server has ICU, as a
    # production database on en_US.UTF-8 does: punctuation then counts for almost nothing.
    linguistic = raw(db, "SELECT 'a_b' < 'a-b' AND 'a-b' < 'aa'")[0][0]
    names = ["a", "a-b", "a.b", "a_b", "aa", "ab", "a-", "a-z", "b"]
    for name in names:
        add_account(db, name)
    by_code_point = sorted(names)
    assert search(db, "*") == by_code_point
    # The prefix range of "a-*" is ["a-", "a.") by code point: a linguistic collation puts
    # "a-b" after "a." and the search would miss it.
    assert search(db, "a-*") == ["a-", "a-b", "a-z"]
    assert search(db, "a?b") == ["a-b", "a.b", "a_b"]
    # Pages follow the same order, so paging by `after` sees every name exactly once.
    seen, after = [], ""
    while page := search(db, "*", after=after, limit=2):
        seen += page
        after = page[-1]
    assert seen == by_code_point
    if not linguistic:
        pytest.skip("the server has no ICU en-US collation: only code point order was tested")


# -- U+0000 ---------------------------------------------------------------------------------

def test_nul_in_body_and_client_msg_id_round_trips(db):
    alice, bob = add_account(db, "Alice"), add_account(db, "Bob")
    body, cmid = "a\x00b \x00\x00 ☺ \U0001F600", "id\x00with nul"
    first, plain = store(db, [new_message(alice, "Bob", body, cmid),
                              new_message(alice, "Bob", "plain")])
    assert not first.duplicate and not plain.duplicate
    found = db.read(lambda repo: repo.undelivered(bob.id, 10))
    assert [(m.id, m.body) for m in found] == [(first.message_id, body),
                                             (plain.message_id, "plain")]
    assert db.read(lambda repo: repo.receipt(alice.id, cmid)) == first.message_id
    assert db.read(lambda repo: repo.receipt(alice.id, "id")) is None
    (again,) = store(db, [new_message(alice, "Bob", body, cmid)])
    assert (again.duplicate, again.message_id) == (True, first.message_id)
    # Stored as UTF-8 bytes: nothing lost, nothing re-encoded.
    assert raw(db, "SELECT body FROM messages WHERE id = ?", (first.message_id,)) == [
        (body.encode(),)]


def test_search_with_nul_finds_nothing_and_does_not_fail(service):
    for name in ("ab", "abc", "b"):
        service.register(name, PASSWORD)
    assert service.search("a\x00*", "", 10) == ([], "")
    assert service.search("*\x00", "", 10) == ([], "")
    # an `after` with U+0000 in it is the same place as the part before it
    assert [a.name for a in service.search("*", "ab\x00zzz", 10)[0]] == ["abc", "b"]


# -- store_messages -------------------------------------------------------------------------

def test_store_messages_gives_each_send_its_outcome_in_order(db):
    alice, bob, carol = (add_account(db, n) for n in ("Alice", "Bob", "Carol"))
    ghost = Account(id=10**9, name="Ghost", created_at=0)
    (earlier,) = store(db, [new_message(alice, "Bob", "earlier", "c-0")])
    outcomes = store(db, [
        new_message(alice, "Bob", "one", "c-1"),        # 0 stored
        new_message(alice, "nobody", "lost"),            # 1 unknown recipient
        new_message(alice, "BOB", "repeat", "c-1"),      # 2 repeat within the batch
        new_message(ghost, "Bob", "from beyond"),        # 3 sender no longer exists
        new_message(alice, "bob", "retry", "c-0"),       # 4 repeat of a committed send
        new_message(bob, "Carol", "two", "c-1"),         # 5 same id, another sender: new
        new_message(alice, "Carol", "three"),            # 6 stored
    ])
    assert isinstance(outcomes[0], SendOutcome) and not outcomes[0].duplicate
    assert isinstance(outcomes[1], NoSuchAccount)
    assert (outcomes[2].duplicate, outcomes[2].message_id) == (True, outcomes[0].message_id)
    assert isinstance(outcomes[3], InvalidCredentials)
    assert (outcomes[4].duplicate, outcomes[4].message_id) == (True, earlier.message_id)
    assert not outcomes[5].duplicate and not outcomes[6].duplicate
    stored = [outcomes[i].message_id for i in (0, 5, 6)]
    assert earlier.message_id < stored[0] < stored[1] < stored[2]  # ids follow batch order
    assert outcomes[0].message.body == "one" and outcomes[0].recipient_id == bob.id
    assert [m.body for m in db.read(lambda repo: repo.undelivered(bob.id, 10))] == [
        "earlier", "one"]
    assert [m.body for m in db.read(lambda repo: repo.undelivered(carol.id, 10))] == [
        "two", "three"]
    assert raw(db, "SELECT count(*) FROM send_receipts") == [(3,)]


def test_store_messages_queue_cap(db):
    alice, bob = add_account(db, "Alice"), add_account(db, "Bob")
    store(db, [new_message(alice, "Bob", "waiting")])
    outcomes = store(db, [new_message(alice, "Bob", f"m{i}") for i in range(4)]
                     + [new_message(bob, "Alice", "other way")], cap=3)
    assert [type(o).__name__ for o in outcomes] == [
        "SendOutcome", "SendOutcome", "QueueFull", "QueueFull", "SendOutcome"]
    assert isinstance(outcomes[2], QueueFull) and "Bob" in outcomes[2].message
    assert db.read(lambda repo: repo.count_undelivered(bob.id)) == 3
    ids = [m.id for m in db.read(lambda repo: repo.undelivered(bob.id, 10))]
    with db.unit_of_work() as uow:
        assert uow.repo.delete_messages(bob.id, ids[:1]) == 1
        uow.commit()
    (room,) = store(db, [new_message(alice, "Bob", "room again")], cap=3)
    assert isinstance(room, SendOutcome)


def test_sends_grouped_in_the_writer_keep_their_own_outcomes(service, writer):
    """Sends queued together are stored by one bulk statement; a refusal stays its own."""
    alice = service.register("Alice", PASSWORD)
    service.register("Bob", PASSWORD)
    gate = threading.Event()
    blocker = writer.submit(lambda repo: gate.wait(10))  # holds the writer while sends queue
    futures = [service.submit_send(alice, to, f"to {to}") for to in ("Bob", "nobody", "Bob")]
    gate.set()
    blocker.result(10)
    assert not futures[0].result(10).duplicate
    with pytest.raises(NoSuchAccount):
        futures[1].result(10)
    assert futures[2].result(10).message_id > futures[0].result(10).message_id


# -- reads are snapshots --------------------------------------------------------------------

def test_fetch_count_comes_from_the_same_snapshot_as_the_messages(db, service):
    alice = service.register("Alice", PASSWORD)
    bob = service.register("Bob", PASSWORD)
    service.send(alice, "Bob", "one")

    def read(repo):
        found = repo.undelivered(bob.id, 10)
        service.send(alice, "Bob", "two")  # committed by the writer meanwhile
        return found, repo.count_undelivered(bob.id)

    found, count = db.read(read)
    assert ([m.body for m in found], count) == (["one"], 1)
    assert db.read(lambda repo: repo.count_undelivered(bob.id)) == 2


# -- two servers on one database ------------------------------------------------------------

@pytest.fixture
def second_db(pg_url, db):
    """Another Database on the same PostgreSQL database: a second server process's view."""
    other = Database(pg_url)
    yield other
    other.dispose()


def test_registrations_of_one_name_through_two_servers_give_one_account(
        db, second_db, service, hasher, clock):
    other_writer = GroupCommitWriter(second_db.write_engine)
    try:
        other = ChatService(second_db, other_writer, hasher, clock=clock.now)
        results: list[object] = []
        barrier = threading.Barrier(8)

        def register(svc, name):
            barrier.wait()
            try:
                results.append(svc.register(name, PASSWORD))
            except NameTaken as exc:
                results.append(exc)

        threads = [threading.Thread(target=register, args=(svc, name))
                   for svc, name in [(service, "Alice"), (other, "alice"),
                                     (service, "ALICE"), (other, "aLice")] * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len([r for r in results if isinstance(r, Account)]) == 1
        assert len([r for r in results if isinstance(r, NameTaken)]) == 7
        assert raw(db, "SELECT count(*) FROM accounts") == [(1,)]
    finally:
        other_writer.close()


def run_blocked(fn) -> tuple[threading.Thread, dict]:
    """Run ``fn`` on a thread; returns the thread and where its result or error will be."""
    out: dict = {}

    def target():
        try:
            out["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            out["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, out


def wait_for_lock_wait(db: Database, timeout: float = 10.0) -> None:
    """Until some session of this database waits for a lock held by another."""
    deadline = time.monotonic() + timeout
    with db.read_engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'")).scalar_one()
            conn.rollback()
            if waiting:
                return
            time.sleep(0.02)
    raise AssertionError("no session ever waited for the lock")


def test_retry_through_another_server_during_the_first_send_is_a_duplicate(db, second_db):
    """Server A stores client_msg_id c-1 and has not committed; the client's retry reaches
    server B, whose check finds no receipt yet. B's receipt insert waits for A, then A
    commits: B must answer "duplicate of A's message", not fail its whole batch."""
    alice, bob, carol = (add_account(db, n) for n in ("Alice", "Bob", "Carol"))
    with db.unit_of_work() as server_a:
        (original,) = server_a.repo.store_messages([new_message(alice, "Bob", "hi", "c-1")])

        def server_b():
            with second_db.unit_of_work() as uow:
                outcomes = uow.repo.store_messages([
                    new_message(alice, "Bob", "hi", "c-1"),
                    new_message(bob, "Carol", "unrelated, same batch")])
                uow.commit()
                return outcomes

        thread, out = run_blocked(server_b)
        wait_for_lock_wait(db)
        server_a.commit()
    thread.join(30)
    assert "error" not in out, out.get("error")
    retry, unrelated = out["result"]
    assert (retry.duplicate, retry.message_id) == (True, original.message_id)
    assert isinstance(unrelated, SendOutcome) and not unrelated.duplicate
    assert raw(db, "SELECT body FROM messages ORDER BY id") == [
        (b"hi",), (b"unrelated, same batch",)]
    assert db.read(lambda repo: repo.count_undelivered(carol.id)) == 1


def test_recipient_deleted_by_another_process_during_a_send(db, second_db):
    """`chat admin delete-account bob` (another process) commits between a server's check
    that Bob exists and its insert: that send becomes no_such_account, the others go on."""
    alice, bob, carol = (add_account(db, n) for n in ("Alice", "Bob", "Carol"))
    with db.unit_of_work() as admin:
        admin.repo.delete_account(bob.id)

        def server():
            with second_db.unit_of_work() as uow:
                outcomes = uow.repo.store_messages([
                    new_message(alice, "Bob", "for bob"),
                    new_message(alice, "Carol", "for carol")])
                uow.commit()
                return outcomes

        thread, out = run_blocked(server)
        wait_for_lock_wait(db)
        admin.commit()
    thread.join(30)
    assert "error" not in out, out.get("error")
    for_bob, for_carol = out["result"]
    assert isinstance(for_bob, NoSuchAccount)
    assert isinstance(for_carol, SendOutcome)
    assert raw(db, "SELECT recipient_id FROM messages") == [(carol.id,)]
    assert raw(db, "PRAGMA foreign_key_check") == []
