"""A slow consumer: a logged-in client that never reads, while 10,000 messages are sent to it.

The server's memory stays bounded (the outbox of a connection holds at most 4 MiB), other
sessions go on being served, the slow session is dropped, and every message still waits for
the account. (tests/e2e/test_server_lifecycle.py has a smaller version without the memory
and volume checks.)
"""

from __future__ import annotations

import statistics

import pytest

from chatserver.protocol import LoggedIn, Register, Send

from .helpers import (
    MIB,
    PASSWORD,
    WAIT,
    MemoryWatch,
    Probe,
    RawPeer,
    fetch_everything,
    wait_until,
)

MESSAGES = 10_000
BODY = "x" * 8000  # 10,000 pushes of ~8 KB: 80 MB, far over the 4 MiB outbox and the kernel
# buffers: a server that buffered them for the slow peer would grow by more than the bound.
MEMORY_BOUND = 48 * MIB  # generous over the 4 MiB outbox + page caches, well under 80 MB


@pytest.mark.timeout(240)
def test_slow_consumer_is_dropped_memory_stays_bounded_and_nothing_is_lost(start_server):
    server = start_server("--send-rate", "0", "--max-queued-per-account", "0", "--sync", "normal")
    pid = server.proc.pid
    slow = RawPeer(server.host, server.port, rcvbuf=4096)
    try:
        slow.hello()
        assert isinstance(slow.request(Register(request_id=2, name="slow", password=PASSWORD)),
                          LoggedIn)
        # from now on "slow" reads nothing
        probe = Probe(server.host, server.port, "bystander")
        flooder = server.client(timeout=WAIT * 3)
        flooder.register("flooder", PASSWORD)
        probe.wait_rounds(5)
        baseline = list(probe.latencies)
        watch = MemoryWatch(pid)

        sent_ids: list[int] = []
        pushed: list[bool] = []
        for start in range(0, MESSAGES, 250):  # pipelined windows: fast, and many per commit
            futures = [flooder.submit(lambda rid, i=i: Send(
                request_id=rid, to="slow", client_msg_id=f"f{i}", body=f"{i} {BODY}"))
                for i in range(start, start + 250)]
            for future in futures:
                reply = future.result(WAIT * 3)
                assert not reply.duplicate, reply
                sent_ids.append(reply.message_id)
                pushed.append(reply.pushed)
        growth = watch.stop()
        probe.wait_rounds(3)
        during = probe.latencies[len(baseline):]
        probe.stop()
        probe.check()

        assert len(sent_ids) == len(set(sent_ids)) == MESSAGES
        assert growth < MEMORY_BOUND, f"server RSS grew by {growth / MIB:.1f} MiB"
        # the slow session was dropped (documented limit: 4 MiB queued for it) ...
        assert "dropping a connection that does not read" in server.log
        assert pushed[0] is True and pushed[-1] is False  # ... and is no longer pushed to
        wait_until(lambda: not flooder.list_accounts("slow").accounts[0].online,
                   what="the slow session to end")
        # what the slow peer finally reads ends with the close (EOF or reset)
        received = slow.drain_until_closed(timeout=WAIT)
        assert received < len(sent_ids) * len(BODY)

        # all 10,000 wait for the account's next login, in order
        with server.client() as again:
            assert again.login("slow", PASSWORD).pending == MESSAGES
            seen = [m.id for m in fetch_everything(again, ack=True)]
            assert seen == sent_ids
        flooder.close()
    finally:
        slow.close()
    assert "Traceback" not in server.log
    print(f"\nslow consumer: RSS growth {growth / MIB:.1f} MiB; bystander round trip median "
          f"{statistics.median(baseline) * 1000:.1f} ms before, "
          f"{statistics.median(during) * 1000:.1f} ms during the flood "
          f"(max {max(during) * 1000:.1f} ms, {len(during)} rounds); slow peer read "
          f"{received} bytes before the close")


def test_a_reader_that_keeps_up_is_never_dropped(start_server):
    """300 sends of 60 KB (18 MB) to a recipient that reads all the time: every one is pushed,
    in order, and the recipient is not dropped.

    The sender keeps at most WINDOW sends (2.4 MB) ahead of what the recipient has read, so
    the server can never hold more than that for it, whatever the machine's scheduling: a
    drop here can only come from the server counting wrongly, never from a reader that fell
    behind. Batches of sends still share commits, and a commit's pushes are held for one
    write (tests/unit/test_sessions.py checks that holding them does not count against the
    4 MiB limit)."""
    window = 40
    server = start_server("--send-rate", "0", "--max-queued-per-account", "0")
    with server.client(timeout=WAIT * 3) as reader, server.client(timeout=WAIT * 3) as sender:
        reader.register("reader", PASSWORD)  # its reader thread reads all the time
        sender.register("sender", PASSWORD)
        body = "r" * 60_000
        futures, pushed = [], []
        for i in range(300):
            if i >= window:  # the recipient has read all but the last `window` pushes
                pushed.append(reader.pushes.get(timeout=WAIT * 3).message.id)
            futures.append(sender.submit(
                lambda rid, i=i: Send(request_id=rid, to="reader", client_msg_id=f"b{i}",
                                      body=f"{i} {body}")))
        pushed += [reader.pushes.get(timeout=WAIT * 3).message.id for _ in range(window)]
        replies = [future.result(WAIT * 3) for future in futures]
        assert all(reply.pushed for reply in replies)
        assert pushed == [reply.message_id for reply in replies]
        assert not reader.closed
    assert "dropping a connection that does not read" not in server.log
