"""Fixtures of the security tests: real certificates, an in-process server with a fake clock.

The subprocess fixtures (``server_factory``, ``server``, ``connect``) come from
tests/conftest.py; what is here is what only the security tests need.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import trustme

from chatserver.client import ChatClient
from chatserver.passwords import HashParameters, PasswordHasher
from chatserver.protocol import CLOSED, NEED_DATA, Connection, encode_event
from chatserver.server import ChatServer, ServerConfig
from chatserver.service import ChatService
from chatserver.storage.database import Database
from chatserver.storage.migrate import ensure_schema
from chatserver.storage.writer import GroupCommitWriter

PASSWORD = "correct horse battery"  # >= 8 characters
# Cheap Argon2 parameters for tests only (the default costs 64 MiB and t=3 per hash).
CHEAP_HASH = HashParameters(time_cost=1, memory_kib=64, parallelism=1)
WAIT = 30.0  # a bound so a broken server cannot hang the suite; never asserted on


# -- certificates -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Certificates:
    """PEM files of a test CA and a server certificate it issued (for localhost, 127.0.0.1)."""

    ca: Path  # the CA that issued the server certificate: what a client trusts
    cert: Path  # the server certificate chain
    key: Path  # its private key
    other_ca: Path  # a CA that issued nothing the server uses


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certificates:
    where = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    files = Certificates(ca=where / "ca.pem", cert=where / "server.pem", key=where / "key.pem",
                         other_ca=where / "other-ca.pem")
    ca.cert_pem.write_to_path(str(files.ca))
    # the chain (leaf first) without the key, and the key on its own, as an operator has them
    files.cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(files.key))
    trustme.CA().cert_pem.write_to_path(str(files.other_ca))
    return files


def tls_args(certs: Certificates) -> list[str]:
    return ["--tls-cert", str(certs.cert), "--tls-key", str(certs.key)]


# -- an in-process server with an injected clock -------------------------------------------------

class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self, start: float = 10_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class InProcessServer:
    """Database + writer + service + ChatServer wired as chatserver/app.py does, with a clock."""

    def __init__(self, db_path: Path, clock: FakeClock, *, hasher: PasswordHasher | None = None,
                 **config: object):
        self.clock = clock
        self.db = Database(str(db_path))
        ensure_schema(self.db)
        self.db.enable_wal()
        self.writer = GroupCommitWriter(self.db.write_engine)
        self.hasher = hasher or PasswordHasher(CHEAP_HASH)
        self.service = ChatService(self.db, self.writer, self.hasher)
        self.config = replace(ServerConfig(host="127.0.0.1", port=0), **config)
        self.server = ChatServer(self.config, self.service, clock=clock)
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self.host, self.port = self.server.address
        self._clients: list[ChatClient] = []

    def client(self, **kwargs) -> ChatClient:
        client = ChatClient(self.host, self.port, timeout=WAIT, **kwargs)
        self._clients.append(client)
        return client

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        self.server.stop()
        self._thread.join(WAIT)
        self.writer.close()
        self.db.dispose()


@pytest.fixture
def inprocess(tmp_path) -> Iterator[Callable[..., InProcessServer]]:
    """``inprocess(clock=None, hasher=None, **ServerConfig fields)``: a started server."""
    started: list[InProcessServer] = []

    def start(clock: FakeClock | None = None, **kwargs) -> InProcessServer:
        server = InProcessServer(tmp_path / f"inproc{len(started)}.db", clock or FakeClock(),
                                 **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# -- counting password hash computations ----------------------------------------------------------

class CountingArgon2:
    """Stands in for the argon2 hasher inside a PasswordHasher and records how many of its
    computations run at the same moment. ``meet`` callers wait for each other at a barrier,
    which proves that many *can* run at once; a cap that let more through would show up in
    ``max_active``."""

    def __init__(self, real, meet: int = 1):
        self._real = real
        self._lock = threading.Lock()
        self._barrier = threading.Barrier(meet) if meet > 1 else None
        self.active = 0
        self.max_active = 0
        self.calls = {"hash": 0, "verify": 0}

    def _enter(self, what: str) -> None:
        with self._lock:
            self.active += 1
            self.calls[what] += 1
            self.max_active = max(self.max_active, self.active)
        if self._barrier is not None:
            self._barrier.wait(WAIT)
        time.sleep(0.01)  # room for a caller the cap should have held back to get in

    def _leave(self) -> None:
        with self._lock:
            self.active -= 1

    def hash(self, password):
        self._enter("hash")
        try:
            return self._real.hash(password)
        finally:
            self._leave()

    def verify(self, password_hash, password):
        self._enter("verify")
        try:
            return self._real.verify(password_hash, password)
        finally:
            self._leave()

    def check_needs_rehash(self, password_hash):
        return self._real.check_needs_rehash(password_hash)


def instrument(hasher: PasswordHasher, meet: int = 1) -> CountingArgon2:
    counter = CountingArgon2(hasher._argon2, meet)
    hasher._argon2 = counter
    return counter


# -- raw frames -----------------------------------------------------------------------------------

class RawConnection:
    """A plain TCP connection speaking frames by hand (no reader thread, no Hello unless asked)."""

    def __init__(self, host: str, port: int, timeout: float = WAIT):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.codec = Connection(role="client")

    def send(self, *events) -> None:
        self.sock.sendall(b"".join(encode_event(e) for e in events))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def events_until_closed(self) -> list:
        """Every frame the server sends until it closes the connection."""
        events = []
        while True:
            event = self.codec.next_event()
            if event is CLOSED:
                return events
            if event is not NEED_DATA:
                events.append(event)
                continue
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            self.codec.receive_data(data)

    def next_event(self):
        while True:
            event = self.codec.next_event()
            if event is CLOSED:
                raise ConnectionError("closed")
            if event is not NEED_DATA:
                return event
            self.codec.receive_data(self.sock.recv(65536))

    def close(self) -> None:
        self.sock.close()
