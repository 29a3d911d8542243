"""Durability across restarts: clean SIGTERM and crash-like SIGKILL, on the same database file."""

from __future__ import annotations

import signal

import pytest

from chatserver.client import ServerError
from chatserver.protocol import LoggedIn, Notice, Register, Send, Sent

from .helpers import PASSWORD, WAIT, drain, fetch_all, wait_until
from .rawframes import RawClient


def test_sigterm_then_restart_keeps_accounts_and_queued_messages(server_factory, tmp_path):
    db = tmp_path / "persist.db"
    first = server_factory(db)
    with first.client() as bob:
        bob.register("Bob", PASSWORD)
    alice = first.client()
    alice.register("alice", PASSWORD)
    sent = [alice.send("bob", f"queued {i} \u00e9").message_id for i in range(10)]
    # a raw observer sees exactly what goes over the wire before the close
    raw = RawClient(first.host, first.port)
    raw.hello()

    assert first.stop(signal.SIGTERM) == 0
    # the connected client was told before the connection closed
    notices = [e for e in drain_until_closed(alice) if isinstance(e, Notice)]
    assert [n.code for n in notices] == ["shutting_down"]
    events = raw.events_until_closed()
    assert [(type(e), e.code) for e in events] == [(Notice, "shutting_down")]
    raw.close()
    assert "Traceback" not in first.log

    second = server_factory(db)
    with second.client() as bob:
        reply = bob.login("BOB", PASSWORD)
        assert (reply.name, reply.pending) == ("Bob", 10)
        messages = fetch_all(bob)
        assert [(m.id, m.sender, m.body) for m in messages] == [
            (sent[i], "alice", f"queued {i} \u00e9") for i in range(10)]
        assert bob.ack(sent) == 10
        assert fetch_all(bob) == []
        # the name is still taken, and the old password still the one
        with second.client() as other, pytest.raises(ServerError) as info:
            other.register("bob", PASSWORD)
        assert info.value.code == "name_taken"
    assert second.stop() == 0

    third = server_factory(db)
    with third.client() as bob:
        assert bob.login("bob", PASSWORD).pending == 0  # the acks were durable too
        assert fetch_all(bob) == []


def drain_until_closed(client) -> list:
    """Everything the client's reader queued up to the close of the connection."""
    wait_until(lambda: client.closed, what="the client to see the close")
    return drain(client)


def test_sigint_is_a_clean_stop_too(server_factory, tmp_path):
    server = server_factory(tmp_path / "int.db")
    with server.client() as client:
        client.register("alice", PASSWORD)
        assert server.stop(signal.SIGINT) == 0
        wait_until(lambda: client.closed, what="the close")
        assert [e.code for e in drain(client)] == ["shutting_down"]
    assert "Traceback" not in server.log


def test_sigkill_after_sent_keeps_every_acknowledged_send(server_factory, tmp_path):
    db = tmp_path / "crash.db"
    first = server_factory(db)
    with first.client() as bob:
        bob.register("bob", PASSWORD)
    alice = first.client()
    alice.register("alice", PASSWORD)
    sent = [alice.send("bob", f"m{i}", client_msg_id=f"c{i}").message_id for i in range(50)]
    assert first.kill() == -signal.SIGKILL  # right after the last Sent: no clean shutdown
    alice.close()

    second = server_factory(db)
    with second.client() as bob:
        assert bob.login("bob", PASSWORD).pending == 50
        messages = fetch_all(bob)
        assert [(m.id, m.body) for m in messages] == [(sent[i], f"m{i}") for i in range(50)]
        assert len({m.id for m in messages}) == 50  # each exactly once
        # a retry of an acknowledged send after the crash is still recognised
        with second.client() as alice:
            alice.login("alice", PASSWORD)
            retry = alice.send("bob", "m49", client_msg_id="c49")
            assert (retry.message_id, retry.duplicate) == (sent[49], True)
        assert bob.ack(sent) == 50
        assert fetch_all(bob) == []


def test_sigkill_after_ack_keeps_the_deletions(server_factory, tmp_path):
    """A crash right after Acked: acknowledged messages must not come back."""
    db = tmp_path / "ackcrash.db"
    first = server_factory(db)
    with first.client() as alice, first.client() as bob:
        alice.register("alice", PASSWORD)
        bob.register("bob", PASSWORD)
        sent = [alice.send("bob", f"m{i}").message_id for i in range(20)]
        assert bob.ack(sent[:12]) == 12
        assert first.kill() == -signal.SIGKILL

    second = server_factory(db)
    with second.client() as bob:
        assert bob.login("bob", PASSWORD).pending == 8
        assert [m.id for m in fetch_all(bob)] == sent[12:]


def test_sigkill_after_delete_account_keeps_the_deletion(server_factory, tmp_path):
    db = tmp_path / "delcrash.db"
    first = server_factory(db)
    with first.client() as alice, first.client() as bob:
        alice.register("alice", PASSWORD)
        bob.register("bob", PASSWORD)
        kept = alice.send("bob", "from the departed").message_id
        bob.send("alice", "discarded")
        assert alice.delete_account(PASSWORD) == 1
        assert first.kill() == -signal.SIGKILL

    second = server_factory(db)
    with second.client() as client:
        assert client.list_accounts().accounts[0].name == "bob"
        assert len(client.list_accounts().accounts) == 1
        client.register("alice", "a new password")
        assert fetch_all(client) == []
        client.logout()
        client.login("bob", PASSWORD)
        assert [(m.id, m.sender) for m in fetch_all(client)] == [(kept, "alice")]


def test_ids_keep_increasing_across_restarts(server_factory, tmp_path):
    """Message ids are never reused, even after everything was acknowledged and a restart."""
    db = tmp_path / "ids.db"
    first = server_factory(db)
    with first.client() as alice, first.client() as bob:
        alice.register("alice", PASSWORD)
        bob.register("bob", PASSWORD)
        old = [alice.send("bob", "x").message_id for _ in range(3)]
        assert bob.ack(old) == 3
    assert first.stop() == 0

    second = server_factory(db)
    with second.client() as alice:
        alice.login("alice", PASSWORD)
        new = alice.send("bob", "y").message_id
    assert new > max(old)


def test_shutdown_notice_reaches_every_connection(server_factory, tmp_path):
    server = server_factory(tmp_path / "many.db")
    clients = [server.client() for _ in range(5)]
    try:
        clients[0].register("alice", PASSWORD)
        clients[1].login("alice", PASSWORD)
        clients[2].register("bob", PASSWORD)
        # clients[3] and [4] stay anonymous
        assert server.stop() == 0
        for client in clients:
            wait_until(lambda c=client: c.closed, timeout=WAIT, what="the close")
            assert [e.code for e in drain(client)] == ["shutting_down"]
    finally:
        for client in clients:
            client.close()


def test_sigterm_answers_requests_already_sent_then_notifies(server_factory, tmp_path):
    """Shutdown drains: pipelined requests are all answered, then the notice, then the close;
    and exactly the answered sends are in the database afterwards."""
    db = tmp_path / "drain.db"
    first = server_factory(db)
    with first.client() as sink:
        sink.register("sink", PASSWORD)
    raw = RawClient(first.host, first.port)
    raw.hello()
    raw.send(Register(request_id=2, name="pipeliner", password=PASSWORD))
    assert isinstance(raw.reply(), LoggedIn)
    count = 300
    raw.send(*[Send(request_id=3 + i, to="sink", client_msg_id=f"p{i}", body=f"p{i}")
               for i in range(count)])
    assert first.stop(signal.SIGTERM) == 0
    events = raw.events_until_closed()
    raw.close()
    sent = [e for e in events if isinstance(e, Sent)]
    assert [e.request_id for e in sent] == list(range(3, 3 + count))
    assert [type(e) for e in events] == [Sent] * count + [Notice]
    assert events[-1].code == "shutting_down"

    second = server_factory(db)
    with second.client() as sink:
        assert sink.login("sink", PASSWORD).pending == count
        got = fetch_all(sink)
        assert [(m.id, m.body) for m in got] == [(e.message_id, f"p{i}")
                                                  for i, e in enumerate(sent)]



def test_passwords_survive_a_change_of_hash_parameters(server_factory, tmp_path):
    """Restarting with other Argon2 parameters rehashes at login; the password still works."""
    db = tmp_path / "rehash.db"
    first = server_factory(db)
    with first.client() as client:
        client.register("alice", PASSWORD)
    assert first.stop() == 0
    for extra in (["--argon2-time-cost", "2"], ["--argon2-memory-kib", "128"], []):
        server = server_factory(db, extra)
        with server.client() as client:
            assert client.login("alice", PASSWORD).name == "alice"
            client.logout()
            with pytest.raises(ServerError) as info:
                client.login("alice", PASSWORD + "x")
            assert info.value.code == "invalid_credentials"
            assert client.login("alice", PASSWORD).name == "alice"
        assert server.stop() == 0
