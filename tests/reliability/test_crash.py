"""Crash test: SIGKILL at random moments, several times, while senders and recipients work.

Senders send continuously (to recipients that are online and to recipients that stay offline)
through ResilientClient, which reconnects, logs in again and retries an unconfirmed send with
the same client_msg_id. Online recipients take pushes and acknowledge them; after each
reconnect they fetch what is offered again. The server is killed with SIGKILL (no clean
shutdown) at seeded random moments and restarted on the same file.

At the end, after deduplication by message id:
- every message whose send was acknowledged (``Sent``) was delivered, exactly once;
- no message was stored twice (one id per sender and sequence number: retries never duplicate);
- per sender, ids increase in send order, and every offer lists messages in id order;
- no message whose acknowledgement was confirmed (``Acked``) is ever offered again;
- ``PRAGMA integrity_check`` is ok after every crash.
"""

from __future__ import annotations

import os
import queue
import random
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import pytest

from chatserver.client import ChatClient, ConnectionLost, ServerError
from chatserver.protocol import Push
from chatserver.resilient import ResilientClient
from chatserver.storage.database import SYNC_LEVELS
from tests.conftest import ServerProcess

from .helpers import BASE_ARGS, PASSWORD, WAIT, fetch_everything, integrity_check, wait_until

SEED = int(os.environ.get("CHAT_CRASH_SEED", "20240611"))  # vary it to explore
SENDERS = [f"sender{i}" for i in range(4)]
ONLINE = ["online0", "online1"]
OFFLINE = ["offline0", "offline1"]
KILLS = 4
MIN_PROGRESS = 50  # sends confirmed by each server incarnation before it is killed
SERVER_ARGS = [*BASE_ARGS, "--send-rate", "0", "--max-queued-per-account", "0"]
BODY = re.compile(r"^(sender\d+) #(\d+) ")


class Target:
    """Where the server currently listens (the port changes at every restart)."""

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = 0

    def connect(self) -> ChatClient:
        return ChatClient(self.host, self.port, timeout=WAIT)


@dataclass
class SenderLog:
    name: str
    confirmed: list[tuple[int, str, int]] = field(default_factory=list)  # (seq, to, id)
    duplicates: int = 0  # Sent replies with duplicate=True (a retry of a committed send)
    gave_up: list[str] = field(default_factory=list)  # ResilientClient raised instead of retrying
    errors: list[BaseException] = field(default_factory=list)


@dataclass
class RecipientLog:
    name: str
    offers: list[tuple[str, int, list]] = field(default_factory=list)  # (kind, conn, messages)
    acked: set[int] = field(default_factory=set)  # ids whose Ack got its Acked reply
    reoffered: list[int] = field(default_factory=list)  # confirmed-acked ids offered again
    acked_on: dict[int, int] = field(default_factory=dict)  # id -> connection number of its ack
    connections: int = 0
    errors: list[BaseException] = field(default_factory=list)


def sender_loop(log: SenderLog, target: Target, rng: random.Random, stop: threading.Event,
                ready: threading.Barrier):
    try:
        client = ResilientClient(target.connect)
        client.login(log.name, PASSWORD)
        ready.wait(WAIT * 6)
        seq = 0
        while not stop.is_set():
            seq += 1
            to = rng.choice(ONLINE + OFFLINE)
            body = f"{log.name} #{seq} to {to}"
            key = f"{log.name}-{seq}"
            while True:  # the send must end confirmed, however many crashes it meets
                try:
                    sent = client.send(to, body, client_msg_id=key)
                    break
                except (ConnectionLost, OSError, ServerError) as exc:
                    # ResilientClient gave up (or its reconnect raised): go on retrying the
                    # same key, which is exactly what it promises to make safe.
                    if isinstance(exc, ServerError) and exc.code != "storage_unavailable":
                        raise
                    log.gave_up.append(f"{type(exc).__name__}: {exc}")
                    time.sleep(0.05)
            log.duplicates += sent.duplicate
            log.confirmed.append((seq, to, sent.message_id))
        client.close()
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        log.errors.append(exc)


def recipient_loop(log: RecipientLog, target: Target, stop: threading.Event,
                   ready: threading.Barrier):
    """Stay online: take pushes and acknowledge them; after each reconnect fetch the backlog."""

    def offered(kind: str, messages: list) -> None:
        # A push can cross an ack of the same message made through a fetch on the same
        # connection (it was sent before the ack was processed); a push on a later connection
        # of a message acknowledged earlier would be a real re-offer.
        already = [m.id for m in messages
                   if m.id in log.acked and log.acked_on[m.id] < log.connections]
        log.reoffered.extend(already)
        log.offers.append((kind, log.connections, list(messages)))

    while not stop.is_set():
        client = None
        try:
            client = target.connect()
            client.login(log.name, PASSWORD)
            log.connections += 1
            while True:  # what waits is offered again: fetch it, acknowledge it
                acked_before = set(log.acked)
                page = client.fetch(1000)
                log.reoffered.extend(m.id for m in page.messages if m.id in acked_before)
                log.offers.append(("fetch", log.connections, list(page.messages)))
                if page.messages:
                    ids = [m.id for m in page.messages]
                    client.ack(ids)
                    log.acked.update(ids)
                    log.acked_on.update((i, log.connections) for i in ids)
                if page.remaining == 0:
                    break
            if log.connections == 1:
                ready.wait(WAIT * 6)
            while not stop.is_set():
                batch = []
                try:
                    batch.append(client.pushes.get(timeout=0.1))
                    while len(batch) < 200:
                        batch.append(client.pushes.get_nowait())
                except queue.Empty:
                    pass
                pushes = [e.message for e in batch if isinstance(e, Push)]
                if pushes:
                    offered("push", pushes)
                    ids = [m.id for m in pushes]
                    client.ack(ids)
                    log.acked.update(ids)
                    log.acked_on.update((i, log.connections) for i in ids)
                if client.closed:
                    break
        except (ConnectionLost, OSError, ServerError):
            time.sleep(0.05)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            log.errors.append(exc)
            return
        finally:
            if client is not None:
                client.close()


# Both sync levels survive a process crash; at normal the loop commits sends itself
# (ChatServer.hold_sends), at full the writer thread does when several clients send.
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sync", SYNC_LEVELS)
def test_sigkill_at_random_moments_loses_and_duplicates_nothing(tmp_path, sync):
    rng = random.Random(SEED)
    db = tmp_path / "crash.db"
    target = Target()
    servers: list[ServerProcess] = []

    def start() -> ServerProcess:
        server = ServerProcess(db, [*SERVER_ARGS, "--sync", sync]).start()
        servers.append(server)
        target.host, target.port = server.host, server.port
        return server

    server = start()
    try:
        with target.connect() as setup:
            for name in SENDERS + ONLINE + OFFLINE:
                setup.register(name, PASSWORD)
                setup.logout()

        stop_senders, stop_recipients = threading.Event(), threading.Event()
        senders = [SenderLog(name) for name in SENDERS]
        recipients = [RecipientLog(name) for name in ONLINE]
        ready = threading.Barrier(len(senders) + len(recipients) + 1)
        threads = [threading.Thread(target=sender_loop, daemon=True,
                                    args=(log, target, random.Random(rng.random()), stop_senders,
                                          ready))
                   for log in senders]
        threads += [threading.Thread(target=recipient_loop, daemon=True,
                                     args=(log, target, stop_recipients, ready))
                    for log in recipients]
        for thread in threads:
            thread.start()
        ready.wait(WAIT * 6)  # everyone is connected and logged in before the first kill

        def confirmed_so_far() -> int:
            return sum(len(log.confirmed) for log in senders)

        for _ in range(KILLS):
            # Each incarnation confirms some sends before it dies (however loaded the machine
            # is), then dies at a random moment.
            progress = confirmed_so_far() + MIN_PROGRESS
            wait_until(lambda progress=progress: confirmed_so_far() >= progress
                       or any(log.errors for log in senders + recipients),
                       timeout=WAIT * 6, what="the senders to make progress")
            time.sleep(rng.uniform(0.0, 1.5))
            assert server.kill() == -9
            assert integrity_check(db) == "ok"  # the file as the crash left it
            time.sleep(rng.uniform(0.0, 0.5))  # clients meet a dead port for a while
            server = start()
        progress = confirmed_so_far() + MIN_PROGRESS  # the last incarnation serves too
        wait_until(lambda progress=progress: confirmed_so_far() >= progress
                   or any(log.errors for log in senders + recipients),
                   timeout=WAIT * 6, what="the senders to make progress")

        stop_senders.set()
        for thread in threads[:len(senders)]:
            thread.join(WAIT * 3)
        stop_recipients.set()
        for thread in threads[len(senders):]:
            thread.join(WAIT * 3)
        assert not any(thread.is_alive() for thread in threads)
        for log in senders + recipients:
            assert log.errors == [], (log.name, log.errors)

        # Every recipient, online or not, takes what still waits for it.
        final: dict[str, list] = {}
        with target.connect() as reader:
            for name in ONLINE + OFFLINE:
                pending = reader.login(name, PASSWORD).pending
                final[name] = fetch_everything(reader, ack=True)
                assert pending == len(final[name])
                reader.logout()
            for name in ONLINE + OFFLINE:  # and nothing is offered after the acknowledgement
                assert reader.login(name, PASSWORD).pending == 0
                assert reader.fetch(1000).messages == ()
                reader.logout()
        assert server.stop() == 0
    finally:
        for s in servers:
            if s.proc and s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait(WAIT)
    assert integrity_check(db) == "ok"
    for s in servers:
        assert "Traceback" not in s.log, s.log

    # -- what was confirmed to each sender --------------------------------------------------
    confirmed = {(log.name, seq): (to, mid) for log in senders for seq, to, mid in log.confirmed}
    assert len(confirmed) >= MIN_PROGRESS * (KILLS + 1)
    ids = [mid for _to, mid in confirmed.values()]
    assert len(set(ids)) == len(ids), "two confirmed sends share a message id"
    for log in senders:
        seqs = [seq for seq, _to, _mid in log.confirmed]
        assert seqs == list(range(1, len(seqs) + 1))  # each send confirmed before the next
        by_recipient = defaultdict(list)
        for _seq, to, mid in log.confirmed:
            by_recipient[to].append(mid)
        for to, mids in by_recipient.items():
            assert mids == sorted(mids) and len(set(mids)) == len(mids), (log.name, to)

    # -- what each recipient was offered ------------------------------------------------------
    offers: dict[str, list[tuple[str, int, list]]] = {name: [] for name in ONLINE + OFFLINE}
    for log in recipients:
        offers[log.name].extend(log.offers)
        assert log.reoffered == [], f"{log.name}: acknowledged messages offered again"
        back = {m.id for m in final[log.name]} & log.acked
        assert not back, f"{log.name}: acknowledged messages offered again at the end: {back}"
    for name, messages in final.items():
        offers[name].append(("final", -1, messages))

    for name, their_offers in offers.items():
        delivered: dict[int, str] = {}
        for kind, _conn, messages in their_offers:
            offered_ids = [m.id for m in messages]
            if kind != "push":  # a fetch lists messages oldest first
                assert offered_ids == sorted(offered_ids), (name, kind)
            for m in messages:
                assert delivered.setdefault(m.id, m.body) == m.body  # an id never changes
        # pushes on one connection come in per-sender order
        for log in recipients:
            if log.name != name:
                continue
            streams = defaultdict(list)
            for kind, conn, messages in log.offers:
                if kind == "push":
                    for m in messages:
                        streams[(conn, m.sender)].append(m.id)
            for key, stream in streams.items():
                assert stream == sorted(stream), (name, key)
        # exactly once after dedup by id: one id per (sender, sequence number)
        seen: dict[tuple[str, int], int] = {}
        for mid, body in delivered.items():
            match = BODY.match(body)
            assert match, body
            key = (match.group(1), int(match.group(2)))
            assert key not in seen, f"{name} received {key} twice, as {seen[key]} and {mid}"
            seen[key] = mid
        # every confirmed send reached its recipient, with the id its sender was given
        for key, (to, mid) in confirmed.items():
            if to == name:
                assert seen.get(key) == mid, f"confirmed send {key} -> {name} ({mid}) was lost"
        # nothing arrived that no sender had confirmed (senders end only after a confirmation)
        assert set(seen) <= set(confirmed), set(seen) - set(confirmed)
    print(f"\ncrash test: {len(confirmed)} confirmed sends, "
          f"{sum(log.duplicates for log in senders)} retries answered as duplicates, "
          f"ResilientClient gave up {sum(len(log.gave_up) for log in senders)} times "
          f"{[g for log in senders for g in log.gave_up][:3]}, "
          f"{sum(log.connections for log in recipients)} recipient connections, {KILLS} kills")
