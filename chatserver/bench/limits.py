"""``chat bench --limits``: this machine's own ceilings, measured without the chat server.

- SQLite: a file in WAL mode with the server's pragmas (busy_timeout, foreign_keys, the
  synchronous level), a table shaped like ``messages`` with the same indexes, driven from
  Python's sqlite3 module:
  * commit rate: BEGIN IMMEDIATE; one INSERT; COMMIT, in a loop (what one durable send needs
    at the least);
  * batched insert rate: 1,000 rows per transaction with executemany (the ceiling of group
    commit);
  * drain rate: SELECT the recipient's 1,000 oldest rows, DELETE them by id, COMMIT (what a
    fetch + ack of a page needs at the least).
- Loopback TCP: a Python echo server in another process; one client writes 64 bytes and
  waits for them to come back, in a loop (the round trip of one request with no work).

Each figure is measured for ``seconds`` (2 s by default).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sqlite3
import tempfile
import time

from chatserver.bench.histogram import Histogram
from chatserver.bench.target import ProcessProbe, machine_busy_seconds
from chatserver.storage.database import BUSY_TIMEOUT_MS, NEW_DATABASE_PAGE_SIZE

now_ns = time.monotonic_ns

_SCHEMA = """
CREATE TABLE accounts (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL);
CREATE TABLE messages (
    id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    recipient_id INTEGER NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    sender_id INTEGER,
    sender_name VARCHAR(32) NOT NULL,
    sent_at BIGINT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX ix_messages_recipient_id_id ON messages (recipient_id, id);
INSERT INTO accounts (name) VALUES ('sender'), ('recipient');
"""
_INSERT = ("INSERT INTO messages (recipient_id, sender_id, sender_name, sent_at, body) "
           "VALUES (2, 1, 'sender', ?, ?)")
_BODY = "x" * 64


class _Others:
    """CPU % used by other processes of the machine while a limit is measured."""

    def __init__(self, helper: ProcessProbe | None = None):
        self.helper = helper
        self.busy0 = machine_busy_seconds()
        self.own0 = _own_cpu() + self._helper_cpu()
        self.t0 = time.monotonic()

    def _helper_cpu(self) -> float:
        cpu = self.helper.cpu_seconds() if self.helper is not None else None
        return cpu or 0.0

    def pct(self) -> float | None:
        busy = machine_busy_seconds()
        wall = time.monotonic() - self.t0
        if busy is None or self.busy0 is None or wall <= 0:
            return None
        own = _own_cpu() + self._helper_cpu() - self.own0
        return round(max(0.0, 100.0 * (busy - self.busy0 - own) / wall), 1)


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def _result(name: str, ops: int, seconds: float, hist: Histogram | None, unit: str,
            others: _Others | None = None) -> dict:
    return {"name": name, "ops": ops, "seconds": round(seconds, 3),
            "rate": round(ops / seconds, 1) if seconds > 0 else None, "unit": unit,
            "latency_ms": hist.summary_ms() if hist is not None else None,
            "other_cpu_pct": others.pct() if others is not None else None}


def _timed(name: str, unit: str, seconds: float, step) -> dict:
    """Repeat ``step() -> units done`` for ``seconds`` (or until it does none); a result
    with the latency of each step."""
    hist = Histogram()
    count = 0
    others = _Others()
    start = t = now_ns()
    stop = start + int(seconds * 1e9)
    while t < stop:
        done_units = step()
        done = now_ns()
        if not done_units:
            break
        hist.record(done - t)
        t = done
        count += done_units
    return _result(name, count, (t - start) / 1e9, hist, unit, others)


def _open(path: str, sync: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA page_size = {NEW_DATABASE_PAGE_SIZE}")  # the server's, for a new file
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {sync.upper()}")
    return conn


def sqlite_limits(sync: str, seconds: float = 2.0, directory: str | None = None) -> list[dict]:
    """Commit rate, batched insert rate and drain rate of SQLite at ``sync`` (full|normal)."""
    with tempfile.TemporaryDirectory(prefix="chat-bench-sqlite-", dir=directory) as tmp:
        conn = _open(os.path.join(tmp, "limits.db"), sync)
        try:
            conn.executescript(_SCHEMA)
            def one_commit() -> int:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(_INSERT, (now_ns(), _BODY))
                conn.execute("COMMIT")
                return 1

            def insert_1000() -> int:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(_INSERT, [(now_ns(), _BODY)] * 1000)
                conn.execute("COMMIT")
                return 1000

            def drain_1000() -> int:  # oldest 1,000 of the recipient, delete by id, commit
                conn.execute("BEGIN IMMEDIATE")
                ids = [r[0] for r in conn.execute(
                    "SELECT id, sender_name, recipient_id, sent_at, body FROM messages "
                    "WHERE recipient_id = 2 ORDER BY id LIMIT 1000")]
                if ids:
                    conn.execute(f"DELETE FROM messages WHERE recipient_id = 2 AND id IN "
                                 f"({','.join('?' * len(ids))})", ids)
                conn.execute("COMMIT")
                return len(ids)

            return [
                _timed(f"sqlite commit ({sync})", "commits", seconds, one_commit),
                _timed(f"sqlite insert x1000 ({sync})", "rows", seconds, insert_1000),
                _timed(f"sqlite fetch+delete x1000 ({sync})", "rows", seconds, drain_1000),
            ]
        finally:
            conn.close()


def _echo_server(ready, port_value, poll: bool) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port_value.value = listener.getsockname()[1]
    ready.set()
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.setblocking(not poll)
    with conn:
        while True:
            try:
                data = conn.recv(65536)
            except BlockingIOError:  # polling: try again at once, never sleep
                continue
            if not data:
                return
            conn.sendall(data)


LOOPBACK = "loopback round trip"
LOOPBACK_POLLING = "loopback round trip (server polling)"


def loopback_limit(seconds: float = 2.0, size: int = 64, *, poll: bool = False) -> dict:
    """Round trips per second of ``size`` bytes to a Python echo server in another process
    that sleeps in ``recv`` between requests or, with ``poll``, polls for them (as the chat
    server's loop does while its clients answer quickly: no wake-up on its side)."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    port = ctx.Value("i", 0)
    proc = ctx.Process(target=_echo_server, args=(ready, port, poll), daemon=True)
    proc.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the echo server did not start")
        sock = socket.create_connection(("127.0.0.1", port.value))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = b"x" * size
        hist = Histogram()
        ops = 0
        others = _Others(ProcessProbe(proc.pid))
        with sock:
            start = now_ns()
            stop = start + int(seconds * 1e9)
            t = start
            while t < stop:
                sock.sendall(payload)
                got = 0
                while got < size:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise RuntimeError("the echo server closed the connection")
                    got += len(chunk)
                done = now_ns()
                hist.record(done - t)
                t = done
                ops += 1
        return _result(LOOPBACK_POLLING if poll else LOOPBACK, ops, (t - start) / 1e9, hist,
                       "round trips", others)
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def measure_limits(syncs: list[str], seconds: float = 2.0, progress=None) -> list[dict]:
    """All the limits: SQLite at each sync level, then loopback (sleeping, then polling)."""
    results = []
    for sync in syncs:
        if progress:
            progress(f"limits: sqlite ({sync})")
        results.extend(sqlite_limits(sync, seconds))
    if progress:
        progress("limits: loopback round trip")
    results.append(loopback_limit(seconds))
    results.append(loopback_limit(seconds, poll=True))
    return results
