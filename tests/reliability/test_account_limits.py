"""Per-account limits refuse with explicit errors, never silent drops.

One send at a time is covered in tests/e2e/test_limits.py; here sends arrive pipelined and
from several senders at once: every request gets exactly one reply, each refusal says why
(and when to retry), and what was stored is exactly what was confirmed.
"""

from __future__ import annotations

import threading
import time

from chatserver.protocol import Error, Send, Sent

from .helpers import PASSWORD, WAIT, fetch_everything


def pipelined_sends(client, to: str, bodies: list[str]) -> list:
    futures = [client.submit(lambda rid, body=body: Send(request_id=rid, to=to, body=body))
               for body in bodies]
    return [future.result(WAIT) for future in futures]


def test_queue_cap_is_exact_under_concurrent_pipelined_senders(start_server):
    cap = 25
    server = start_server("--send-rate", "0", "--max-queued-per-account", str(cap))
    senders = [server.client() for _ in range(3)]
    try:
        with server.client() as bob:
            bob.register("bob", PASSWORD)
            bob.logout()
            for i, client in enumerate(senders):
                client.register(f"sender{i}", PASSWORD)
            replies: dict[int, list] = {}

            def run(i: int) -> None:
                replies[i] = pipelined_sends(senders[i], "bob", [f"s{i} m{k}" for k in range(20)])

            threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WAIT * 3)
            every = [r for i in range(3) for r in replies[i]]
            assert len(every) == 60  # one reply per request, none missing
            sent = [r for r in every if isinstance(r, Sent)]
            refused = [r for r in every if isinstance(r, Error)]
            assert len(sent) == cap and len(refused) == 60 - cap
            assert {r.code for r in refused} == {"queue_full"}
            assert all("bob" in r.text for r in refused)

            bob.login("bob", PASSWORD)
            stored = fetch_everything(bob, ack=False)
            assert sorted(m.id for m in stored) == sorted(r.message_id for r in sent)
            # each sender's accepted messages are a prefix of what it sent, in order: once
            # refused, a later send of the same sender was never accepted meanwhile
            for i in range(3):
                ok = [isinstance(r, Sent) for r in replies[i]]
                assert ok == sorted(ok, reverse=True), ok
            # acknowledging makes room again, exactly as much as was acknowledged
            assert bob.ack([m.id for m in stored[:5]]) == 5
            again = pipelined_sends(senders[0], "bob", [f"again {k}" for k in range(8)])
            assert [isinstance(r, Sent) for r in again] == [True] * 5 + [False] * 3
            assert {r.code for r in again[5:]} == {"queue_full"}
    finally:
        for client in senders:
            client.close()


def test_rate_limit_refuses_explicitly_and_its_retry_after_is_honest(start_server):
    server = start_server("--send-rate", "5", "--send-burst", "10")
    with server.client() as alice, server.client() as bob:
        alice.register("alice", PASSWORD)
        bob.register("bob", PASSWORD)
        bob.logout()
        started = time.monotonic()
        replies = pipelined_sends(alice, "bob", [f"m{k}" for k in range(60)])
        elapsed = time.monotonic() - started
        sent = [r for r in replies if isinstance(r, Sent)]
        refused = [r for r in replies if isinstance(r, Error)]
        assert len(sent) + len(refused) == 60
        # the burst, plus what refilled meanwhile at 5/s (however slow the machine is)
        assert 10 <= len(sent) <= 10 + 5 * elapsed + 1, (len(sent), elapsed)
        assert {r.code for r in refused} == {"rate_limited"}
        assert all(0 < r.retry_after_ms <= 1000 for r in refused)  # one token at 5/s
        # waiting as told is enough
        time.sleep(refused[-1].retry_after_ms / 1000 + 0.05)
        assert alice.send("bob", "after waiting").duplicate is False
        # nothing refused was stored, nothing accepted was lost
        bob.login("bob", PASSWORD)
        stored = [m.id for m in fetch_everything(bob, ack=False)]
        assert stored[:-1] == [r.message_id for r in sent]
