"""Many clients at once: exactly-once delivery after acks, order, and no storage errors."""

from __future__ import annotations

import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest

from chatserver.client import ServerError
from chatserver.protocol import Push
from chatserver.storage.database import SYNC_LEVELS

from .helpers import PASSWORD, WAIT, drain, fetch_all


# Every test at both sync levels: at --sync normal the I/O loop holds a turn's lone sends
# and commits them together itself (ChatServer.hold_sends); at full the writer thread does.
@pytest.fixture(params=SYNC_LEVELS)
def server(request, server_factory):
    return server_factory(extra_args=["--sync", request.param])


CLIENTS = 50
PER_CLIENT = 20
FAN_OUT = 5  # each client writes to 5 others, 4 messages each, so per-pair order matters


def name(i: int) -> str:
    return f"user{i:02d}"


def recipient(i: int, k: int) -> int:
    return (i + 1 + k % FAN_OUT) % CLIENTS


def test_fifty_clients_sending_at_once(server):
    start = threading.Barrier(CLIENTS)
    sent_all = threading.Barrier(CLIENTS)

    def run(i: int):
        client = server.client()
        try:
            client.register(name(i), PASSWORD)
            start.wait(WAIT * 3)  # everyone is online before anyone sends
            sent = []
            for k in range(PER_CLIENT):
                reply = client.send(name(recipient(i, k)), f"{i}:{k}", client_msg_id=f"{i}-{k}")
                sent.append((k, reply))
            sent_all.wait(WAIT * 6)  # every push has been queued before anyone fetches
            fetched = fetch_all(client)
            pushes = drain(client)
            acked = client.ack([m.id for m in fetched])
            after = client.fetch(1000)
            return sent, fetched, pushes, acked, after
        finally:
            client.close()

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(run, range(CLIENTS)))

    # -- what the senders were told
    id_to_message: dict[int, tuple[int, int, int]] = {}  # id -> (sender, k, recipient)
    for i, (sent, *_rest) in enumerate(results):
        assert len(sent) == PER_CLIENT
        for k, reply in sent:
            assert reply.duplicate is False
            assert reply.pushed is True, (i, k)  # every recipient was online
            assert reply.message_id not in id_to_message, "a message id was given twice"
            id_to_message[reply.message_id] = (i, k, recipient(i, k))
        ids = [reply.message_id for _, reply in sent]
        assert ids == sorted(ids)  # one sender's ids increase
    assert len(id_to_message) == CLIENTS * PER_CLIENT

    # -- what each recipient was offered
    offered_total = 0
    for j, (_sent, fetched, pushes, acked, after) in enumerate(results):
        expected = sorted(mid for mid, (_, _, r) in id_to_message.items() if r == j)
        got = [m.id for m in fetched]
        assert got == expected, j  # each exactly once, oldest first
        offered_total += len(got)
        for m in fetched:
            sender, k, _ = id_to_message[m.id]
            assert (m.sender, m.body) == (name(sender), f"{sender}:{k}")
        by_sender = defaultdict(list)
        for m in fetched:
            by_sender[m.sender].append(int(m.body.split(":")[1]))
        for ks in by_sender.values():
            assert ks == sorted(ks)  # per-sender order kept for this recipient
        # pushes: every message once, nothing foreign, per-sender order kept
        assert all(isinstance(p, Push) for p in pushes), pushes
        pushed_ids = [p.message.id for p in pushes]
        assert sorted(pushed_ids) == expected, j
        pushed_by_sender = defaultdict(list)
        for p in pushes:
            pushed_by_sender[p.message.sender].append(p.message.id)
        for ids in pushed_by_sender.values():
            assert ids == sorted(ids)
        # after the ack nothing is offered again
        assert acked == len(expected)
        assert (after.messages, after.remaining) == ((), 0)
    assert offered_total == CLIENTS * PER_CLIENT

    log = server.log
    assert "database is locked" not in log
    assert "Traceback" not in log
    assert "internal error" not in log


def test_concurrent_registration_of_one_name(server):
    contenders = 16
    barrier = threading.Barrier(contenders)

    def attempt(i: int):
        with server.client() as client:
            barrier.wait(WAIT)
            try:
                return client.register("Highlander" if i % 2 else "highlander", f"{PASSWORD}{i}")
            except ServerError as exc:
                return exc.code

    with ThreadPoolExecutor(contenders) as pool:
        outcomes = list(pool.map(attempt, range(contenders)))
    winners = [o for o in outcomes if not isinstance(o, str)]
    assert len(winners) == 1, outcomes
    assert sorted(o for o in outcomes if isinstance(o, str)) == ["name_taken"] * (contenders - 1)
    assert "Traceback" not in server.log
    with server.client() as client:
        assert [a.name for a in client.list_accounts("highlander").accounts] == [winners[0].name]


def test_concurrent_retries_of_one_client_msg_id(server, user, connect):
    """Several sessions of one account race the same idempotent send: one message results."""
    user("target").logout()
    sessions = 8
    clients = [connect() for _ in range(sessions)]
    clients[0].register("sender", PASSWORD)
    for client in clients[1:]:
        client.login("sender", PASSWORD)
    barrier = threading.Barrier(sessions)

    def send(client):
        barrier.wait(WAIT)
        return client.send("target", "exactly once", client_msg_id="the-one")

    with ThreadPoolExecutor(sessions) as pool:
        replies = list(pool.map(send, clients))
    assert len({r.message_id for r in replies}) == 1
    assert sorted(r.duplicate for r in replies) == [False] + [True] * (sessions - 1)
    target = connect()
    assert target.login("target", PASSWORD).pending == 1
    assert [m.body for m in fetch_all(target)] == ["exactly once"]
    assert "Traceback" not in server.log


def test_concurrent_acks_of_the_same_messages(server, user, connect):
    """Two sessions of one recipient ack the same ids at once: each message counted once."""
    sender = user("sender")
    user("rcpt").logout()
    ids = [sender.send("rcpt", f"m{i}").message_id for i in range(200)]
    a, b = connect(), connect()
    a.login("rcpt", PASSWORD)
    b.login("rcpt", PASSWORD)
    barrier = threading.Barrier(2)

    def ack(client, chunk):
        barrier.wait(WAIT)
        return sum(client.ack(ids[i:i + 50]) for i in chunk)

    with ThreadPoolExecutor(2) as pool:
        counts = list(pool.map(ack, (a, b), (range(0, 200, 50), range(150, -1, -50))))
    assert sum(counts) == 200
    assert fetch_all(a) == []


def test_reads_and_writes_interleaved(server, user, connect):
    """Searches, fetches and sends from many connections at once all succeed."""
    writer = user("writer")
    user("reader").logout()
    stop = threading.Event()
    errors: list = []

    def read_loop():
        with server.client() as client:
            client.login("reader", PASSWORD)
            while not stop.is_set():
                try:
                    client.list_accounts("*er")
                    client.fetch(10)
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    return

    threads = [threading.Thread(target=read_loop) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        ids = [writer.send("reader", f"m{i}").message_id for i in range(50)]
    finally:
        stop.set()
        for t in threads:
            t.join(WAIT * 3)
    assert errors == []
    reader = connect()
    reader.login("reader", PASSWORD)
    assert [m.id for m in fetch_all(reader)] == ids
    assert "database is locked" not in server.log
    assert "Traceback" not in server.log
