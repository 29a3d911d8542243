"""Shared fixtures: a real ``chat serve`` process on port 0, and clients connected to it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatserver.client import ChatClient

# Cheap Argon2 parameters for tests only: the real default (64 MiB, t=3) would make the
# 50-client tests take minutes on 2 cores. Production never uses these.
FAST_HASH_ARGS = ["--argon2-time-cost", "1", "--argon2-memory-kib", "64"]
_LISTENING = re.compile(r"listening on (\S+):(\d+)")


def chat_command(*args: str) -> list[str]:
    """The ``chat`` command line, run with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "chatserver_cli", *args]


class ServerProcess:
    """A ``chat serve`` subprocess; ``start()`` waits until it prints its address."""

    def __init__(self, db_path: Path, extra_args: list[str] | None = None):
        self.db_path = Path(db_path)
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.stderr_lines: list[str] = []
        self._stderr_thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> ServerProcess:
        args = chat_command("serve", "--db", str(self.db_path), "--port", "0",
                            *FAST_HASH_ARGS, *self.extra_args)
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.stderr_lines = []
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_thread.start()
        line = self.proc.stdout.readline()  # blocks until the server has bound its port
        self.stdout_lines = [line]
        match = _LISTENING.search(line)
        if not match:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"server did not start: {line!r} {''.join(self.stderr_lines)}")
        self.host, self.port = match.group(1), int(match.group(2))
        if "--metrics-port" in self.extra_args:
            self.stdout_lines.append(self.proc.stdout.readline())
        return self

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.stderr_lines)

    def client(self, **kwargs) -> ChatClient:
        return ChatClient(self.host, self.port, **kwargs)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        if self._stderr_thread:
            self._stderr_thread.join(5)
        return code

    def kill(self) -> int:
        """SIGKILL: no clean shutdown, as in a crash."""
        return self.stop(signal.SIGKILL)


@pytest.fixture
def server_factory(tmp_path) -> Iterator:
    """Start servers (``server_factory(db_path=None, extra_args=None)``); all stopped at the end."""
    started: list[ServerProcess] = []

    def start(db_path: Path | None = None, extra_args: list[str] | None = None) -> ServerProcess:
        server = ServerProcess(db_path or tmp_path / "chat.db", extra_args).start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)


@pytest.fixture
def server(server_factory) -> ServerProcess:
    """One running server on a fresh database file."""
    return server_factory()


@pytest.fixture
def connect(server) -> Iterator:
    """Open clients to ``server`` (``connect(**kwargs)``); all closed at the end."""
    clients: list[ChatClient] = []

    def open_client(**kwargs) -> ChatClient:
        client = server.client(**kwargs)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.close()
