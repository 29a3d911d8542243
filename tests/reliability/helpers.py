"""Helpers of the reliability tests: raw peers, process statistics, bounded waits.

Nothing here asserts on durations: every wait has a generous upper bound that only guards
against a hang, and tests check what happened, never how fast.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import struct
import threading
import time
from pathlib import Path

from chatserver.client import ChatClient, ConnectionLost, ServerError
from chatserver.passwords import HashParameters
from chatserver.protocol import LoggedIn, Register, Welcome
from tests.e2e.helpers import error_code, fetch_everything, wait_until  # noqa: F401 - used by the tests here
from tests.e2e.rawframes import Closed, RawClient

PASSWORD = "reliable password"  # >= 8 characters, as the server requires
WAIT = 10.0  # bound for anything asynchronous; a guard against hangs, never asserted on
# Options of every server these tests start: they register many accounts from 127.0.0.1,
# far beyond the per-address registration limit (which has tests of its own in tests/e2e).
BASE_ARGS = ["--registrations-per-hour", "0"]
MIB = 1024 * 1024
# Password hashing for servers started in-process (ChatApp): cheap, so that registering and
# logging in take no time worth mentioning.
CHEAP = HashParameters(time_cost=1, memory_kib=64, parallelism=1)


def log_has(server, text: str) -> bool:
    return text in server.log


# -- the server process as the kernel sees it ---------------------------------------------------

def proc_status(pid: int) -> dict[str, int]:
    """Numeric fields of /proc/PID/status (VmRSS, VmHWM in KiB; Threads)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0])
    return out


def rss_bytes(pid: int) -> int:
    return proc_status(pid)["VmRSS"] * 1024


def hwm_bytes(pid: int) -> int:
    """The peak resident set size of the process so far."""
    return proc_status(pid)["VmHWM"] * 1024


def thread_count(pid: int) -> int:
    return proc_status(pid)["Threads"]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class MemoryWatch:
    """Samples a process's RSS on a thread; ``peak`` is the largest sample."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid = pid
        self.start = rss_bytes(pid)
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except (FileNotFoundError, ProcessLookupError, KeyError):
                return

    def stop(self) -> int:
        """Stop sampling; the growth of the peak over the start, in bytes."""
        self._stop.set()
        self._thread.join(WAIT)
        try:
            self.peak = max(self.peak, rss_bytes(self.pid))
        except (FileNotFoundError, ProcessLookupError, KeyError):
            pass
        return self.peak - self.start


# -- the database file ----------------------------------------------------------------------

def integrity_check(db_path: Path) -> str:
    """``PRAGMA integrity_check`` of a database file (run while no server has it open)."""
    conn = sqlite3.connect(str(db_path))
    try:
        return "\n".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


# -- raw peers ------------------------------------------------------------------------------

class RawPeer(RawClient):
    """``tests/e2e/rawframes.RawClient`` plus what these tests need: a reset instead of a
    FIN, and draining raw bytes without decoding them."""

    def __init__(self, host: str, port: int, *, timeout: float = WAIT, rcvbuf: int | None = None):
        super().__init__(host, port, timeout=timeout, rcvbuf=rcvbuf)

    def drain_until_closed(self, timeout: float = WAIT) -> int:
        """Read and discard raw bytes until the server closes; how many bytes came."""
        self.sock.settimeout(timeout)
        total = 0
        while True:
            try:
                data = self.sock.recv(1024 * 1024)
            except (ConnectionResetError, BrokenPipeError):
                return total
            if not data:
                return total
            total += len(data)

    def abort(self) -> None:
        """Close with a TCP reset instead of a FIN (SO_LINGER 0)."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()


def logged_in_peer(app, name: str) -> RawPeer:
    """A RawPeer on the in-process server ``app``, greeted and registered as ``name``."""
    peer = RawPeer(*app.address)
    assert isinstance(peer.hello(), Welcome)
    assert isinstance(peer.request(Register(request_id=2, name=name, password=PASSWORD)),
                      LoggedIn)
    return peer


# -- a normal client that keeps using the server, to prove it keeps serving -----------------------

class Probe:
    """A well-behaved client that sends to itself, fetches, acknowledges and searches in a
    loop on its own thread. Every request must succeed; ``errors`` lists those that did not."""

    def __init__(self, host: str, port: int, name: str):
        self.client = ChatClient(host, port, timeout=WAIT)
        self.client.register(name, PASSWORD)
        self.name = name
        self.rounds = 0
        self.errors: list[BaseException] = []
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"probe-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            started = time.perf_counter()
            try:
                sent = self.client.send(self.name, f"probe {n}", client_msg_id=f"probe-{n}")
                assert not sent.duplicate, sent
                page = self.client.fetch(1000)
                ids = [m.id for m in page.messages]
                assert sent.message_id in ids, (sent, ids)
                strays = [m for m in page.messages
                          if m.sender != self.name or not m.body.startswith("probe ")]
                assert not strays, f"messages the probe never sent: {strays}"
                assert self.client.ack(ids) == len(ids)
                found = self.client.list_accounts(self.name).accounts
                assert [a.name for a in found] == [self.name], found
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(exc)
                return
            self.latencies.append(time.perf_counter() - started)
            self.rounds += 1

    def wait_rounds(self, more: int = 3) -> None:
        """Wait until the probe has completed ``more`` further rounds (or failed)."""
        target = self.rounds + more
        wait_until(lambda: self.rounds >= target or self.errors or not self._thread.is_alive(),
                   timeout=WAIT * 3, what="the probe to make progress")

    def stop(self) -> None:
        self.alive_at_stop = self._thread.is_alive()
        self._stop.set()
        self._thread.join(WAIT * 3)
        self.client.close()

    def check(self) -> None:
        """The probe was served throughout: no error, and it ran until stopped."""
        assert self.errors == [], self.errors
        if self._stop.is_set():
            assert self.alive_at_stop, "the probe had stopped"
        else:
            assert self._thread.is_alive(), "the probe stopped"


__all__ = [
    "BASE_ARGS", "MIB", "PASSWORD", "WAIT", "Closed", "ConnectionLost", "MemoryWatch", "Probe",
    "RawPeer", "ServerError", "error_code", "fd_count", "fetch_everything", "hwm_bytes",
    "integrity_check", "log_has", "proc_status", "rss_bytes", "thread_count", "wait_until",
]
