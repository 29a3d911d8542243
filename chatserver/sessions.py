"""Who is online where, and the bounded outbound queue of each connection.

A peer that stops reading must never block anyone else: frames for a connection go into its
``Outbox`` and only that connection's writer thread blocks on its socket. When an outbox holds
more than its limit, the connection is dropped instead of buffering without bound; messages
pushed to it are still undelivered in the database and will be offered again.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

OUTBOX_MAX_BYTES = 4 * 1024 * 1024  # per connection; beyond this the peer is too slow
WRITE_BATCH_BYTES = 256 * 1024  # frames joined into one sendall, to save syscalls


class Outbox:
    """Frames waiting to be written to one socket, and the thread that writes them."""

    def __init__(self, sock: socket.socket, *, name: str, max_bytes: int = OUTBOX_MAX_BYTES,
                 on_overflow: Callable[[], None] | None = None):
        self._sock = sock
        self._max_bytes = max_bytes
        self._on_overflow = on_overflow
        self._frames: deque[bytes] = deque()
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._closing = False
        self._failed = False
        self._thread = threading.Thread(target=self._run, name=f"out-{name}", daemon=True)
        self._thread.start()

    def put(self, frame: bytes) -> bool:
        """Queue a frame; False if the connection is closed or now dropped for being slow."""
        overflow = False
        with self._cond:
            if self._closing or self._failed:
                return False
            if self._queued_bytes + len(frame) > self._max_bytes:
                self._failed = overflow = True
                self._frames.clear()
            else:
                self._frames.append(frame)
                self._queued_bytes += len(frame)
                self._cond.notify()
        if overflow:
            log.warning("dropping a connection that does not read (%d bytes queued)",
                        self._queued_bytes)
            _shutdown(self._sock)
            if self._on_overflow:
                self._on_overflow()
            return False
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (for up to ``timeout`` seconds), then stop the writer."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._frames and not self._closing and not self._failed:
                    self._cond.wait()
                if self._failed or not self._frames:
                    return
                batch, size = [], 0
                while self._frames and size < WRITE_BATCH_BYTES:
                    frame = self._frames.popleft()
                    batch.append(frame)
                    size += len(frame)
                self._queued_bytes -= size
            try:
                self._sock.sendall(b"".join(batch) if len(batch) > 1 else batch[0])
            except OSError:  # peer gone or too slow (send timeout): this connection is over
                with self._cond:
                    self._failed = True
                    self._frames.clear()
                _shutdown(self._sock)
                return


class ReplyQueue:
    """A connection's replies, in the order of its requests, though some complete later.

    A send is answered when its commit is done, on the writer's thread, while the
    connection's reader goes on with the next requests; a reply waits here until every
    earlier request has its reply, then all that are ready go to the outbox in order.
    """

    def __init__(self, outbox: Outbox):
        self._outbox = outbox
        self._slots: deque[list] = deque()
        self._cond = threading.Condition()

    def reply(self, frame: bytes) -> None:
        """A reply that is ready now."""
        with self._cond:
            if not self._slots:
                self._outbox.put(frame)
            else:
                self._slots.append([frame])

    def reserve(self) -> list:
        """A place for a reply that will come later (``fill`` it)."""
        slot: list = [None]
        with self._cond:
            self._slots.append(slot)
        return slot

    def fill(self, slot: list, frame: bytes) -> None:
        with self._cond:
            slot[0] = frame
            while self._slots and self._slots[0][0] is not None:
                self._outbox.put(self._slots.popleft()[0])
            self._cond.notify_all()

    def wait_below(self, limit: int, timeout: float | None = None) -> bool:
        """Wait until fewer than ``limit`` replies are outstanding (back-pressure)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._slots) < limit, timeout)


def _shutdown(sock: socket.socket) -> None:
    """Unblock whoever reads or writes this socket; the owner closes it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Session(Protocol):
    """What the registry needs of a connection."""

    def push_frame(self, frame: bytes) -> bool: ...

    def account_deleted(self, frame: bytes) -> None: ...


class SessionRegistry:
    """Live logged-in sessions by account id. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_account: dict[int, set[Session]] = {}

    def attach(self, account_id: int, session: Session) -> None:
        with self._lock:
            self._by_account.setdefault(account_id, set()).add(session)

    def detach(self, account_id: int, session: Session) -> None:
        with self._lock:
            sessions = self._by_account.get(account_id)
            if sessions is not None:
                sessions.discard(session)
                if not sessions:
                    del self._by_account[account_id]

    def sessions_of(self, account_id: int) -> list[Session]:
        with self._lock:
            return list(self._by_account.get(account_id, ()))

    def is_online(self, account_id: int) -> bool:
        with self._lock:
            return account_id in self._by_account

    def online_account_ids(self) -> list[int]:
        with self._lock:
            return list(self._by_account)
