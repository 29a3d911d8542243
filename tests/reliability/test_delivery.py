"""A message leaves the queue only when its recipient acknowledged it, by explicit id.

Single-connection cases (fetched-but-unacked offered again, one message stored between a
fetch and its ack) are in tests/e2e/test_delivery.py; here sends keep arriving while the
recipient fetches and acknowledges in a loop, and pushed messages meet a crash.
"""

from __future__ import annotations

import queue
import random
import threading

from chatserver.protocol import Push, Send

from .helpers import PASSWORD, WAIT, fetch_everything, wait_until


def test_ack_removes_only_the_listed_ids_while_sends_keep_arriving(start_server):
    """Thousands of "stored between the fetch and the ack" races: an ack that deleted more
    than its ids ("everything of this user") would lose messages here."""
    server = start_server("--send-rate", "0", "--max-queued-per-account", "0", "--sync", "normal")
    total, window = 3000, 100
    sent_ids: list[int] = []
    errors: list[BaseException] = []
    with server.client() as alice, server.client() as bob:
        alice.register("alice", PASSWORD)
        bob.register("bob", PASSWORD)
        bob.logout()  # no pushes: bob sees messages only through fetch

        def send_all():
            try:
                for start in range(0, total, window):  # pipelined, so batches commit together
                    futures = [alice.submit(lambda rid, i=i: Send(
                        request_id=rid, to="bob", client_msg_id=f"m{i}", body=f"m{i}"))
                        for i in range(start, start + window)]
                    for future in futures:
                        reply = future.result(WAIT)
                        assert not reply.duplicate, reply
                        sent_ids.append(reply.message_id)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        sender = threading.Thread(target=send_all)
        bob.login("bob", PASSWORD)
        sender.start()
        rng = random.Random(7)
        seen: list[int] = []
        acked = 0
        while True:
            done = not sender.is_alive()  # read before the fetch: then the fetch sees it all
            page = bob.fetch(rng.randint(1, 150))
            ids = [m.id for m in page.messages]
            assert ids == sorted(ids) and (not seen or not ids or ids[0] > seen[-1])
            seen += ids
            if ids:
                count = bob.ack(ids)
                assert count == len(ids), "an ack removed other messages, or missed its own"
                acked += count
            if done and not ids and page.remaining == 0:
                break
        sender.join(WAIT)
        assert errors == []
        assert len(seen) == len(set(seen)) == total == acked
        assert seen == sent_ids  # each message offered once, in order, none lost
        assert fetch_everything(bob, ack=False) == []


def test_pushed_but_unacknowledged_messages_survive_a_crash(start_server, tmp_path):
    """Pushing is not delivering: messages pushed to a live session and never acknowledged are
    still queued after SIGKILL; the acknowledged ones are gone for good."""
    db = tmp_path / "pushed.db"
    server = start_server("--send-rate", "0", db=db)
    with server.client() as alice, server.client() as bob:
        alice.register("alice", PASSWORD)
        bob.register("bob", PASSWORD)
        ids = [alice.send("bob", f"live {i}").message_id for i in range(40)]
        pushed = [bob.pushes.get(timeout=WAIT) for _ in ids]
        assert [p.message.id for p in pushed if isinstance(p, Push)] == ids
        assert bob.ack(ids[:15]) == 15
        assert server.kill() == -9

    again = start_server("--send-rate", "0", db=db)
    with again.client() as bob:
        assert bob.login("bob", PASSWORD).pending == 25
        assert [m.id for m in fetch_everything(bob, ack=False)] == ids[15:]


def test_session_dropped_mid_push_stream_loses_nothing(start_server):
    """A recipient whose connection breaks while pushes are streaming in finds, on its next
    login, every message it had not acknowledged, whether its push arrived or not."""
    server = start_server("--send-rate", "0", "--max-queued-per-account", "0", "--sync", "normal")
    with server.client() as alice:
        alice.register("alice", PASSWORD)
        bob = server.client()
        bob.register("bob", PASSWORD)
        acked: list[int] = []
        uncertain: list[int] = []  # an ack cut off before its reply may or may not have happened
        stop = threading.Event()

        def ack_some():  # acknowledges every other push, until its connection is gone
            while not stop.is_set():
                try:
                    event = bob.pushes.get(timeout=0.05)
                except queue.Empty:
                    continue
                if isinstance(event, Push) and event.message.id % 2 == 0:
                    try:
                        bob.ack([event.message.id])
                        acked.append(event.message.id)
                    except Exception:  # noqa: BLE001 - the connection is cut under it
                        uncertain.append(event.message.id)
                        return

        acker = threading.Thread(target=ack_some)
        acker.start()
        ids = []
        for i in range(400):
            ids.append(alice.send("bob", f"stream {i}").message_id)
            if i == 200:
                bob.close()  # mid-stream
        stop.set()
        acker.join(WAIT)
        wait_until(lambda: not alice.list_accounts("bob").accounts[0].online,
                   what="the server to drop bob's session")
        with server.client() as bob_again:
            bob_again.login("bob", PASSWORD)
            waiting = [m.id for m in fetch_everything(bob_again, ack=True)]
        waiting = [i for i in waiting if i not in uncertain]
        assert waiting == [i for i in ids if i not in set(acked) | set(uncertain)]
        assert len(acked) > 10  # the acknowledgements did happen during the stream
