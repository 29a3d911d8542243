"""`chat serve --db postgresql+psycopg://...` end to end: real server processes, real clients.

One server: two clients chat, the server restarts, what was waiting is still there. Two
servers on one database (the reason to use PostgreSQL): accounts and messages are shared, and
a message stored by one server is pushed to the recipient's sessions on the others too
(announced with NOTIFY; docs/POSTGRES.md).
"""

from __future__ import annotations

import subprocess
import time

import pytest

from chatserver.client import ServerError
from chatserver.protocol import Notice, Push
from tests.conftest import chat_command

PASSWORD = "correct horse battery"
SERVER_ARGS = ["--registrations-per-hour", "0"]
WAIT = 10.0


def listening_pids(engine) -> set[int]:
    """The backends of the servers' announcement listeners (announce.APPLICATION_NAME)."""
    from sqlalchemy import text

    with engine.connect() as conn:
        return {r[0] for r in conn.execute(text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'chat announcement listener'"))}


def end_listening_connections(engine, servers: int = 2) -> set[int]:
    """Terminate every server's listening connection (as a restart or an administrator
    would); returns their backends' pids."""
    from sqlalchemy import text

    old = listening_pids(engine)
    assert len(old) == servers
    with engine.connect() as conn:
        for pid in old:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    return old


@pytest.fixture
def two_servers(new_postgres_database, pg_server_factory):
    """Servers A and B on one new database, alice registered through A and bob through B,
    and an engine on the database: (server_a, server_b, alice, bob, engine). The servers
    must stop cleanly (exit status 0)."""
    from sqlalchemy import create_engine

    pg_url = new_postgres_database()
    migrate(pg_url)
    server_a = pg_server_factory(pg_url, SERVER_ARGS)
    server_b = pg_server_factory(pg_url, SERVER_ARGS)
    engine = create_engine(pg_url)
    alice, bob = server_a.client(), server_b.client()
    try:
        alice.register("alice", PASSWORD)
        bob.register("bob", PASSWORD)
        yield server_a, server_b, alice, bob, engine
    finally:
        alice.close()
        bob.close()
        engine.dispose()
    assert server_a.stop() == 0, server_a.log
    assert server_b.stop() == 0, server_b.log


def migrate(url: str) -> None:
    done = subprocess.run(chat_command("admin", "migrate", "--db", url),
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_two_clients_chat_and_messages_survive_a_restart(pg_url, pg_server_factory):
    server = pg_server_factory(pg_url, SERVER_ARGS)  # an empty database is created at head
    alice, bob = server.client(), server.client()
    try:
        assert alice.register("alice", PASSWORD).pending == 0
        assert bob.register("Bob", PASSWORD).name == "Bob"
        sent = alice.send("bob", "hello bob", client_msg_id="a-1")
        assert sent.pushed and not sent.duplicate
        push = bob.pushes.get(timeout=WAIT)
        assert isinstance(push, Push)
        assert (push.message.id, push.message.sender, push.message.body) == (
            sent.message_id, "alice", "hello bob")
        assert bob.ack([push.message.id]) == 1
        reply = bob.send("alice", "hi alice \x00 ☺")
        assert alice.pushes.get(timeout=WAIT).message.body == "hi alice \x00 ☺"
        assert alice.ack([reply.message_id]) == 1
        bob.logout()
        waiting = [alice.send("Bob", f"while you were away {i}") for i in range(3)]
        assert not any(s.pushed for s in waiting)
        # a retry of an earlier send is recognised, also after it was acknowledged
        again = alice.send("bob", "hello bob", client_msg_id="a-1")
        assert (again.duplicate, again.message_id) == (True, sent.message_id)
    finally:
        alice.close()
        bob.close()
    assert server.stop() == 0, server.log

    server = pg_server_factory(pg_url, SERVER_ARGS)
    bob = server.client()
    try:
        assert bob.login("BOB", PASSWORD).pending == 3
        fetched = bob.fetch()
        assert [(m.id, m.sender, m.body) for m in fetched.messages] == [
            (s.message_id, "alice", f"while you were away {i}") for i, s in enumerate(waiting)]
        assert fetched.remaining == 0
        assert bob.ack([m.id for m in fetched.messages]) == 3
        assert bob.fetch().messages == ()
        page = bob.list_accounts("*")
        assert [(a.name, a.online) for a in page.accounts] == [("alice", False), ("Bob", True)]
        later = bob.send("alice", "after the restart")
        assert later.message_id > max(s.message_id for s in waiting)  # ids never go back
    finally:
        bob.close()
    assert server.stop() == 0, server.log


def test_two_servers_share_one_database(new_postgres_database, pg_server_factory):
    pg_url = new_postgres_database()  # a whole database, as a deployment has it
    migrate(pg_url)  # one process migrates; servers never do on PostgreSQL
    server_a = pg_server_factory(pg_url, SERVER_ARGS)
    server_b = pg_server_factory(pg_url, SERVER_ARGS)
    alice, bob, carol = server_a.client(), server_b.client(), server_b.client()
    try:
        alice.register("alice", PASSWORD)
        bob.register("bob", PASSWORD)  # registered through B, found through A
        bob.logout()

        # Through A to a user who is offline; fetched through B at login.
        first = alice.send("bob", "sent through A")
        assert not first.pushed
        assert bob.login("bob", PASSWORD).pending == 1
        messages = bob.fetch().messages
        assert [(m.id, m.sender, m.body) for m in messages] == [
            (first.message_id, "alice", "sent through A")]

        # Through A to a user online on B: A announces it at commit, B pushes it. (`pushed`
        # says what A itself pushed: nothing.) It stays queued until acknowledged.
        second = alice.send("bob", "while bob is on B")
        assert not second.pushed
        push = bob.pushes.get(timeout=WAIT)
        assert isinstance(push, Push), push
        assert (push.message.id, push.message.sender, push.message.body) == (
            second.message_id, "alice", "while bob is on B")
        assert [m.id for m in bob.fetch().messages] == [first.message_id, second.message_id]
        assert bob.ack([first.message_id, second.message_id]) == 2
        # ... and B to A the same way, for a batch, in order.
        bursts = [bob.send("alice", f"burst {i}") for i in range(20)]
        pushed = [alice.pushes.get(timeout=WAIT).message.id for _ in bursts]
        assert sorted(pushed) == [s.message_id for s in bursts]
        assert alice.ack(pushed) == 20
        # A message acknowledged before its announcement arrives is not pushed: nothing
        # is pushed twice or after its acknowledgement here (B announces only to A).
        assert bob.pushes.empty()

        # Within B a live push still works, and names are unique across both servers.
        carol.register("carol", PASSWORD)
        third = carol.send("bob", "within B")
        assert third.pushed
        assert bob.pushes.get(timeout=WAIT).message.id == third.message_id
        assert alice.list_accounts("*").accounts[1].name == "bob"
        other = server_a.client()
        try:
            with pytest.raises(ServerError) as taken:
                other.register("CAROL", PASSWORD)
            assert taken.value.code == "name_taken"
        finally:
            other.close()

        # An account deleted through B is gone for A at once, and its sessions on A end.
        carol_on_a = server_a.client()
        try:
            carol_on_a.login("carol", PASSWORD)
            assert carol.delete_account(PASSWORD) == 0
            with pytest.raises(ServerError) as gone:
                alice.send("carol", "anyone?")
            assert gone.value.code == "no_such_account"
            notice = carol_on_a.pushes.get(timeout=WAIT)  # A checks every 2 seconds
            assert isinstance(notice, Notice) and notice.code == "account_deleted", notice
            with pytest.raises(ServerError) as anonymous:
                carol_on_a.fetch()
            assert anonymous.value.code == "not_logged_in"
        finally:
            carol_on_a.close()
    finally:
        for client in (alice, bob, carol):
            client.close()
    assert server_a.stop() == 0, server_a.log
    assert server_b.stop() == 0, server_b.log


def test_a_server_that_loses_its_listening_connection_listens_again(two_servers):
    """The database ends the connections that listen for other servers' messages (a
    restart, a failover, an administrator): each server reconnects and listens again, and
    messages across servers are pushed again."""
    server_a, server_b, alice, bob, engine = two_servers
    old = end_listening_connections(engine)
    for _ in range(int(WAIT / 0.05)):  # bounded: both listen again on new connections
        now = listening_pids(engine)
        if len(now) == 2 and not now & old:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the servers did not listen again: {now} (before: {old})")
    to_bob = alice.send("bob", "after the reconnect")
    assert bob.pushes.get(timeout=WAIT).message.id == to_bob.message_id
    to_alice = bob.send("alice", "and back")
    assert alice.pushes.get(timeout=WAIT).message.id == to_alice.message_id
    assert "listening for other servers' messages failed" in server_a.log + server_b.log


def test_messages_stored_while_a_server_was_not_listening_are_pushed_when_it_listens_again(
        two_servers):
    """A message stored through A while B's listening connection is down is never announced
    to B. Once B listens again it pushes what it missed to the recipients it holds, instead
    of leaving it for their next fetch."""
    _server_a, server_b, alice, bob, engine = two_servers
    before = alice.send("bob", "heard")  # announced: B pushes it
    assert bob.pushes.get(timeout=WAIT).message.id == before.message_id
    assert bob.ack([before.message_id]) == 1
    old = end_listening_connections(engine)
    for _ in range(int(WAIT / 0.01)):  # bounded: until both listening backends are gone
        if not listening_pids(engine) & old:
            break
        time.sleep(0.01)
    # Nobody listens now (a server waits a second before listening again): no server hears
    # of these, so only B's catch-up can push them to Bob.
    missed = [alice.send("bob", f"missed {i}") for i in range(3)]
    pushed = [bob.pushes.get(timeout=WAIT) for _ in missed]
    assert [p.message.id for p in pushed] == [m.message_id for m in missed]
    assert [p.message.body for p in pushed] == ["missed 0", "missed 1", "missed 2"]
    assert bob.ack([m.message_id for m in missed]) == 3
    after = alice.send("bob", "heard again")  # and announcements work again
    assert bob.pushes.get(timeout=WAIT).message.id == after.message_id
    assert bob.pushes.empty()  # the message acknowledged before the loss is not pushed again
    for _ in range(int(WAIT / 0.05)):  # bounded: the log line follows the pushes
        if "pushed 3 stored meanwhile" in server_b.log:
            break
        time.sleep(0.05)
    assert "pushed 3 stored meanwhile" in server_b.log, server_b.log
