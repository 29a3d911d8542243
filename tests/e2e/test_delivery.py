"""Acknowledgement and redelivery: a message is delivered only when its recipient acks it."""

from __future__ import annotations

import threading

import pytest

from chatserver.client import ServerError
from chatserver.protocol import Push

from .helpers import PASSWORD, WAIT, drain, fetch_all, next_push, pushes_until


def test_fetched_but_unacked_is_offered_again_after_reconnect(user, connect):
    alice = user("alice")
    user("bob").logout()
    ids = [alice.send("bob", f"m{i}").message_id for i in range(3)]

    bob = connect()
    assert bob.login("bob", PASSWORD).pending == 3
    assert [m.id for m in fetch_all(bob)] == ids
    bob.close()  # no ack

    again = connect()
    assert again.login("bob", PASSWORD).pending == 3
    messages = fetch_all(again)
    assert [(m.id, m.body) for m in messages] == [(ids[i], f"m{i}") for i in range(3)]


def test_acked_messages_are_never_offered_again(user, connect):
    alice = user("alice")
    user("bob").logout()
    ids = [alice.send("bob", f"m{i}").message_id for i in range(4)]

    bob = connect()
    bob.login("bob", PASSWORD)
    assert [m.id for m in fetch_all(bob)] == ids
    assert bob.ack(ids) == 4
    assert fetch_all(bob) == []
    bob.close()

    again = connect()
    assert again.login("bob", PASSWORD).pending == 0
    assert fetch_all(again) == []
    # not pushed again either: the first push this session sees is a new message
    barrier = alice.send("bob", "new")
    got = pushes_until(again, barrier.message_id)
    assert [p.message.id for p in got] == [barrier.message_id]
    assert [m.id for m in fetch_all(again)] == [barrier.message_id]


def test_partial_ack_keeps_the_rest(user, connect):
    alice = user("alice")
    user("bob").logout()
    ids = [alice.send("bob", f"m{i}").message_id for i in range(5)]
    bob = connect()
    bob.login("bob", PASSWORD)
    assert bob.ack([ids[1], ids[3]]) == 2
    assert [m.id for m in fetch_all(bob)] == [ids[0], ids[2], ids[4]]
    bob.close()
    again = connect()
    assert again.login("bob", PASSWORD).pending == 3


def test_pushed_but_unacked_is_offered_by_a_later_fetch(user, connect):
    alice = user("alice")
    bob = user("bob")
    sent = alice.send("bob", "live")
    assert sent.pushed is True
    assert next_push(bob).message.id == sent.message_id
    # a push is not a delivery: the message is still undelivered
    [message] = fetch_all(bob)
    assert (message.id, message.body, message.sender) == (sent.message_id, "live", "alice")
    bob.close()
    again = connect()
    assert again.login("bob", PASSWORD).pending == 1
    assert [m.id for m in fetch_all(again)] == [sent.message_id]
    assert again.ack([sent.message_id]) == 1
    assert fetch_all(again) == []


def test_ack_count_ignores_repeats_unknown_and_foreign_ids(user):
    alice = user("alice")
    bob = user("bob")
    carol = user("carol")
    to_bob = alice.send("bob", "for bob").message_id
    to_carol = alice.send("carol", "for carol").message_id

    assert bob.ack([]) == 0
    assert bob.ack([to_carol]) == 0  # not addressed to bob: ignored
    assert alice.ack([to_carol]) == 0  # nor by its sender
    assert bob.ack([to_carol + 1000, 2**63 - 1]) == 0  # no such messages
    assert bob.ack([to_bob, to_bob, to_bob]) == 1  # repeats count once
    assert bob.ack([to_bob]) == 0  # already acknowledged
    # carol's message survived bob's attempt
    assert [m.id for m in fetch_all(carol)] == [to_carol]
    assert carol.ack([to_carol]) == 1


def test_ack_of_ids_above_the_signed_64_bit_range(server, user):
    """Ack ids are u64 on the wire: an id no message has is ignored, whatever its value.

    The whole u64 range is valid in a frame; ids at or above 2**63 cannot exist in the
    database, so they must count 0, not fail the request.
    """
    alice = user("alice")
    bob = user("bob")
    sent = alice.send("bob", "keep me").message_id
    for ids in ([2**63], [2**64 - 1], [sent, 2**64 - 1]):
        assert bob.ack(ids) == (1 if sent in ids else 0), ids
    assert fetch_all(bob) == []
    assert "Traceback" not in server.log


def test_ack_id_list_limit(user):
    alice = user("alice")
    bob = user("bob")
    sent = alice.send("bob", "x").message_id
    with pytest.raises(ServerError) as info:
        bob.ack(range(10_000_000, 10_001_001))  # 1001 ids
    assert info.value.code == "invalid_request"
    assert [m.id for m in fetch_all(bob)] == [sent]  # nothing happened
    assert bob.ack([sent, *range(10_000_000, 10_000_999)]) == 1  # exactly 1000 ids is fine


def test_ack_from_the_push_callback(server, user):
    """The documented pattern: acknowledge each push as it arrives, without blocking."""
    alice = user("alice")
    acked: list = []
    done = threading.Event()

    def on_push(event):
        if isinstance(event, Push):
            acked.append(bob.ack_nowait([event.message.id]))
            if len(acked) == 5:
                done.set()

    bob = server.client(on_push=on_push)
    try:
        bob.register("bob", PASSWORD)
        ids = [alice.send("bob", f"m{i}").message_id for i in range(5)]
        assert done.wait(WAIT)
        assert [future.result(WAIT).count for future in acked] == [1, 1, 1, 1, 1]
        assert bob.fetch().messages == ()
        assert len(set(ids)) == 5
    finally:
        bob.close()


def test_message_stored_between_fetch_and_ack_is_kept(user):
    """Ack deletes by id: a message that arrived after the fetch is not swept away."""
    alice = user("alice")
    bob = user("bob")
    first = alice.send("bob", "first").message_id
    fetched = [m.id for m in fetch_all(bob)]
    late = alice.send("bob", "late").message_id
    assert bob.ack(fetched) == 1
    assert [m.id for m in fetch_all(bob)] == [late]
    assert fetched == [first]
    drain(bob)
