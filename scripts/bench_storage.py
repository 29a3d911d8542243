"""Storage-layer micro-benchmark: drives ChatService directly (no network).

    python scripts/bench_storage.py [--sync full|normal] [--accounts N] [--seconds S]

Workloads: ``one`` (one thread, one send in flight), ``group`` (8 threads x 32 sends in
flight through submit_send futures), ``drain`` (queue N messages to one account, then
fetch 1000 + ack them until empty; with 1k and 100k queued). Every send carries a
client_msg_id, as the benchmark clients' do.
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import threading
import time

from chatserver.domain import Account
from chatserver.limits import RateLimiter
from chatserver.passwords import HashParameters, PasswordHasher
from chatserver.service import ChatService
from chatserver.storage.database import Database
from chatserver.storage.migrate import ensure_schema
from chatserver.storage.writer import GroupCommitWriter

FAST_HASH = HashParameters(time_cost=1, memory_kib=64, parallelism=1)


def setup(path: str, sync: str, accounts: int):
    db = Database(path, sync=sync)
    ensure_schema(db)
    db.enable_wal()
    with db.write_engine.begin() as conn:
        raw = conn.connection.driver_connection
        raw.executemany(
            "INSERT INTO accounts (name, name_key, password_hash, created_at, last_login_at) "
            "VALUES (?, ?, 'h', 1, 1)", ((f"u{i}", f"u{i}") for i in [*range(accounts), "box"]))
    writer = GroupCommitWriter(db.write_engine)
    service = ChatService(db, writer, PasswordHasher(FAST_HASH),
                          send_limiter=RateLimiter(0, 1))
    return db, writer, service


def account(service: ChatService, i) -> Account:
    found = service.db.read(lambda repo: repo.get_by_key(f"u{i}"))
    return found[0]


def one(service, accounts: int, seconds: float) -> float:
    sender = account(service, 0)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(100):
            service.send(sender, f"u{1 + n % (accounts - 1)}", "hello there", f"one-{n}")
            n += 1
    return n / (time.perf_counter() - start)


def group(service, accounts: int, seconds: float, threads: int = 8, depth: int = 32) -> float:
    counts = [0] * threads
    stop = time.perf_counter() + seconds

    def client(t: int) -> None:
        sender = account(service, t)
        inflight: collections.deque = collections.deque()
        n = 0
        while time.perf_counter() < stop:
            while len(inflight) < depth:
                to = f"u{(t * 7919 + n) % accounts}"
                inflight.append(service.submit_send(sender, to, "hello there", f"g{t}-{n}"))
                n += 1
            inflight.popleft().result()
            counts[t] += 1
        for f in inflight:
            f.result()
            counts[t] += 1

    start = time.perf_counter()
    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - start)


def drain(service, queued: int) -> float:
    sender, inbox = account(service, 0), account(service, "box")
    # Fill quickly (not measured): many sends in flight, cap lifted.
    cap, service.max_queued_per_account = service.max_queued_per_account, 0
    pending = collections.deque()
    for i in range(queued):
        pending.append(service.submit_send(sender, inbox.name, "x" * 40, ""))
        if len(pending) > 2000:
            pending.popleft().result()
    for f in pending:
        f.result()
    service.max_queued_per_account = cap
    got, start = 0, time.perf_counter()
    while True:
        page, _remaining = service.fetch(inbox, 1000)
        if not page:
            break
        service.ack(inbox, [m.id for m in page])
        got += len(page)
    elapsed = time.perf_counter() - start
    assert got == queued, (got, queued)
    return got / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sync", default="full", choices=("full", "normal"))
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--only", default="one,group,drain")
    args = parser.parse_args()
    only = args.only.split(",")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        db, writer, service = setup(os.path.join(tmp, "chat.db"), args.sync, args.accounts)
        try:
            label = f"sync={args.sync} accounts={args.accounts}"
            if "one" in only:
                print(f"{label} one client, 1 in flight: {one(service, args.accounts, args.seconds):,.0f} sends/s")
            if "group" in only:
                print(f"{label} 8 clients x 32 in flight: {group(service, args.accounts, args.seconds):,.0f} sends/s")
            if "drain" in only:
                for queued in (1_000, 100_000):
                    print(f"{label} drain {queued:,}: {drain(service, queued):,.0f} msgs/s")
        finally:
            writer.close()
            db.dispose()


if __name__ == "__main__":
    main()
