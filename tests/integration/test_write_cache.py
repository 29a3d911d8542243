"""The writer's cache (account ids, live senders, queue counts) never changes an outcome.

Each test warms the cache with a send, changes the database behind the writer's back (another
connection, as ``chat admin`` or another process would, or raw SQL on the writer's own
connection, which only the foreign keys can catch), and checks that the next send gets
exactly the outcome the careful, uncached path would give.
"""

from __future__ import annotations

import sqlite3
import threading

import pytest

from chatserver.errors import InvalidCredentials, NoSuchAccount, QueueFull
from chatserver.service import ChatService

from .conftest import PASSWORD, Held

WAIT = 30


def other_process(db, sql: str, params: tuple = ()) -> None:
    """A write committed by another connection (another process, for SQLite)."""
    conn = sqlite3.connect(db.path)
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


def count(db, sql: str, params: tuple = ()) -> int:
    conn = sqlite3.connect(db.path)
    try:
        return conn.execute(sql, params).fetchone()[0]
    finally:
        conn.close()




def capped(db, writer, hasher, clock, cap: int) -> ChatService:
    return ChatService(db, writer, hasher, clock=clock.now, max_queued_per_account=cap)


# -- accounts deleted or replaced elsewhere ---------------------------------------------------

def test_recipient_deleted_by_another_process_is_unknown(service, db, alice, bob):
    service.send(alice, "Bob", "warm the cache")
    other_process(db, "DELETE FROM messages WHERE recipient_id = ?", (bob.id,))
    other_process(db, "DELETE FROM accounts WHERE id = ?", (bob.id,))
    with pytest.raises(NoSuchAccount):
        service.send(alice, "Bob", "to nobody")
    assert count(db, "SELECT count(*) FROM messages") == 0


def test_recipient_replaced_by_another_process_gets_the_new_account(service, db, alice, bob):
    service.send(alice, "Bob", "to the old Bob")
    other_process(db, "DELETE FROM messages WHERE recipient_id = ?", (bob.id,))
    other_process(db, "DELETE FROM accounts WHERE id = ?", (bob.id,))
    other_process(db, "INSERT INTO accounts (name, name_key, password_hash, created_at) "
                      "VALUES ('BOB', 'bob', 'h', 1)")
    new_id = count(db, "SELECT id FROM accounts WHERE name_key = 'bob'")
    assert new_id != bob.id
    outcome = service.send(alice, "bob", "to the new Bob")
    assert outcome.recipient_id == new_id


def test_sender_deleted_by_another_process_is_refused(service, db, alice, bob):
    service.send(alice, "Bob", "warm the cache")
    other_process(db, "DELETE FROM send_receipts WHERE sender_id = ?", (alice.id,))
    other_process(db, "DELETE FROM accounts WHERE id = ?", (alice.id,))
    with pytest.raises(InvalidCredentials):
        service.send(alice, "Bob", "from beyond")
    assert count(db, "SELECT count(*) FROM messages") == 1


def test_deletion_the_cache_cannot_see_is_caught_by_the_foreign_keys(service, db, writer,
                                                                     alice, bob):
    # Raw SQL on the writer's own connection: data_version does not change, so the cache
    # still holds Bob and Alice; the insert's foreign keys refuse, and the batch is redone.
    service.send(alice, "Bob", "warm the cache")
    writer.run(lambda repo: repo.conn.exec_driver_sql(
        "DELETE FROM accounts WHERE id = ?", (bob.id,)))
    with pytest.raises(NoSuchAccount):
        service.send(alice, "Bob", "to nobody")
    writer.run(lambda repo: repo.conn.exec_driver_sql(
        "DELETE FROM accounts WHERE id = ?", (alice.id,)))
    service.register("Bob", PASSWORD)
    with pytest.raises(InvalidCredentials):
        service.send(alice, "Bob", "from beyond")


def inline_send(service, sender, to: str, body: str):
    """A lone send as the I/O loop submits it (inline when the writer is idle): its
    outcome, or its refusal raised, once answered (inline or by the writer thread)."""
    answered = threading.Event()
    answer = []

    def done(outcome, error):
        answer.append((outcome, error))
        answered.set()

    service.submit_send(sender, to, body, on_done=done, inline_if_idle=True)
    assert answered.wait(WAIT)
    outcome, error = answer[0]
    if error is not None:
        raise error
    return outcome


def test_deletion_the_cache_cannot_see_spoils_an_inline_send_which_is_then_redone(
        service, db, writer, alice, bob):
    """Inline, a send is stored without a savepoint: the foreign key's refusal rolls its
    transaction back, and the writer thread redoes it the careful way."""
    inline_send(service, alice, "Bob", "warm the cache")
    writer.run(lambda repo: repo.conn.exec_driver_sql(
        "DELETE FROM messages WHERE recipient_id = ?", (bob.id,)))
    writer.run(lambda repo: repo.conn.exec_driver_sql(
        "DELETE FROM accounts WHERE id = ?", (bob.id,)))
    with pytest.raises(NoSuchAccount):
        inline_send(service, alice, "Bob", "to nobody")
    assert count(db, "SELECT count(*) FROM messages") == 0
    new_bob = service.register("Bob", PASSWORD)
    assert inline_send(service, alice, "Bob", "to the new Bob").recipient_id == new_bob.id
    assert count(db, "SELECT count(*) FROM messages") == 1


def test_batch_with_a_stale_entry_still_stores_the_others(service, db, writer, alice, bob):
    carol = service.register("Carol", PASSWORD)
    service.send(alice, "Bob", "warm the cache")
    service.send(alice, "Carol", "warm the cache")
    writer.run(lambda repo: repo.conn.exec_driver_sql(
        "DELETE FROM accounts WHERE id = ?", (bob.id,)))
    with Held(writer):
        futures = [service.submit_send(alice, to, f"m{i}")
                   for i, to in enumerate(["Carol", "Bob", "Carol"])]
    assert futures[0].result(WAIT).recipient_id == carol.id
    with pytest.raises(NoSuchAccount):
        futures[1].result(WAIT)
    assert futures[2].result(WAIT).recipient_id == carol.id
    assert count(db, "SELECT count(*) FROM messages WHERE recipient_id = ?", (carol.id,)) == 3


# -- client_msg_id ----------------------------------------------------------------------------

def test_retry_in_a_later_batch_is_a_duplicate(service, db, writer, alice, bob):
    first = service.send(alice, "Bob", "once", client_msg_id="c-1")
    with Held(writer):
        futures = [service.submit_send(alice, "Bob", "new", client_msg_id="c-2"),
                   service.submit_send(alice, "Bob", "once", client_msg_id="c-1"),
                   service.submit_send(alice, "Bob", "new", client_msg_id="c-2")]
    new, retry, repeat = (f.result(WAIT) for f in futures)
    assert (retry.message_id, retry.duplicate) == (first.message_id, True)
    assert (new.duplicate, repeat.duplicate, repeat.message_id) == (False, True, new.message_id)
    assert count(db, "SELECT count(*) FROM messages") == 2
    assert count(db, "SELECT count(*) FROM send_receipts") == 2


def test_retry_to_a_full_queue_is_still_a_duplicate(db, writer, hasher, clock, alice, bob):
    service = capped(db, writer, hasher, clock, cap=2)
    first = service.send(alice, "Bob", "one", client_msg_id="c-1")
    service.send(alice, "Bob", "two")
    retry = service.send(alice, "Bob", "one", client_msg_id="c-1")
    assert (retry.message_id, retry.duplicate) == (first.message_id, True)
    with pytest.raises(QueueFull):
        service.send(alice, "Bob", "three", client_msg_id="c-3")


# -- queue counts -----------------------------------------------------------------------------

def test_cap_is_exact_within_one_batch(db, writer, hasher, clock, alice, bob):
    service = capped(db, writer, hasher, clock, cap=25)
    service.send(alice, "Bob", "warm the cache")
    with Held(writer):
        futures = [service.submit_send(alice, "Bob", f"m{i}") for i in range(40)]
    accepted = 0
    for future in futures:
        try:
            future.result(WAIT)
            accepted += 1
        except QueueFull:
            pass
    assert accepted == 24
    assert count(db, "SELECT count(*) FROM messages") == 25


def test_counts_follow_acks_and_other_processes(db, writer, hasher, clock, alice, bob):
    service = capped(db, writer, hasher, clock, cap=3)
    for i in range(3):
        service.send(alice, "Bob", f"m{i}")
    with pytest.raises(QueueFull):
        service.send(alice, "Bob", "full")
    page, _ = service.fetch(bob, 1)
    assert service.ack(bob, [page[0].id]) == 1
    service.send(alice, "Bob", "room for one")  # the ack made room
    with pytest.raises(QueueFull):
        service.send(alice, "Bob", "full again")

    # chat admin purges elsewhere: the writer's count is too high, and is checked again.
    other_process(db, "DELETE FROM messages WHERE recipient_id = ?", (bob.id,))
    for i in range(3):
        service.send(alice, "Bob", f"after purge {i}")
    with pytest.raises(QueueFull):
        service.send(alice, "Bob", "full after purge")

    # Another process stores for Bob: the writer's count would be too low.
    other_process(db, "DELETE FROM messages WHERE recipient_id = ?", (bob.id,))
    service.send(alice, "Bob", "counted")
    for i in range(2):
        other_process(db, "INSERT INTO messages (recipient_id, sender_id, sender_name, sent_at,"
                          " body) VALUES (?, ?, 'Alice', 1, 'elsewhere')", (bob.id, alice.id))
    with pytest.raises(QueueFull):
        service.send(alice, "Bob", "over the cap")
    assert count(db, "SELECT count(*) FROM messages WHERE recipient_id = ?", (bob.id,)) == 3


# -- batches of every size ----------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 2, 3, 127, 128, 129, 255, 300])
def test_every_send_of_a_batch_gets_its_own_row_and_receipt(service, db, writer, alice, bob,
                                                           size):
    # The cached path inserts a batch in multi-row statements of up to 128 rows and derives
    # each send's id from the last one: any slip would give a send another's id. Refusals
    # (an unknown recipient) and in-batch repeats of a client id are mixed in.
    service.send(alice, "Bob", "warm the cache")
    with Held(writer):
        futures = []
        for i in range(size):
            to = "Nobody" if i % 50 == 7 else "Bob"
            futures.append((to, i, service.submit_send(alice, to, f"body {i}",
                                                       client_msg_id=f"c-{i}")))
        repeat = service.submit_send(alice, "Bob", "body 0", client_msg_id="c-0")
    again = repeat.result(WAIT)  # the batch's last send: all of it is committed
    stored = {}
    conn = sqlite3.connect(db.path)
    try:
        rows = dict(conn.execute("SELECT id, body FROM messages WHERE recipient_id = ?",
                                 (bob.id,)).fetchall())
        receipts = dict(conn.execute("SELECT client_msg_id, message_id FROM send_receipts "
                                     "WHERE sender_id = ?", (alice.id,)).fetchall())
    finally:
        conn.close()
    for to, i, future in futures:
        if to == "Nobody":
            with pytest.raises(NoSuchAccount):
                future.result(WAIT)
            assert f"c-{i}" not in receipts
            continue
        outcome = future.result(WAIT)
        assert not outcome.duplicate
        assert rows[outcome.message_id] == f"body {i}"
        assert receipts[f"c-{i}"] == outcome.message_id
        stored[i] = outcome.message_id
    assert len(rows) == len(stored) + 1  # and the warm-up
    assert (again.message_id, again.duplicate) == (stored[0], True)
    ids = sorted(stored.values())
    assert ids == [stored[i] for i in sorted(stored)]  # in the order they were sent
