"""Who is online where, and the output side of each connection.

A peer that stops reading must never block anyone else: every socket is non-blocking, and a
frame for a connection is written at once by whichever thread produced it (the writer that
committed a send, a worker that answered a login) when the socket takes it, or else kept in
that connection's ``Output`` until the I/O loop finds the socket writable again. When an
output holds more than its limit the connection is dropped instead of buffering without
bound; messages pushed to it are still undelivered in the database and will be offered again.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

log = logging.getLogger(__name__)

OUTPUT_MAX_BYTES = 4 * 1024 * 1024  # per connection; beyond this the peer is too slow
WRITE_BATCH_BYTES = 256 * 1024  # queued frames joined into one send, to save syscalls

_corks = threading.local()


@contextmanager
def corked() -> Iterator[None]:
    """Hold this thread's writes until the block ends, then send each socket's in one go.

    The database writer resolves a whole commit's sends inside one: the replies and pushes
    of a batch cost one ``send`` per connection instead of one per frame, and a connection's
    replies are put in order once per batch (``ReplyQueue.fill``) instead of once per send.
    """
    held: list[Output | ReplyQueue] = []
    outer = getattr(_corks, "held", None)
    _corks.held = held
    try:
        yield
    finally:
        _corks.held = outer  # a nested block hands the thread back to the outer one
        for output in held:
            try:  # each must be released, or it would hold its connection's output forever
                output.uncork()
            except Exception:
                log.exception("releasing a corked output failed")


class Output:
    """Bytes on their way to one non-blocking socket. Thread-safe.

    ``write`` sends at once if nothing is queued before it; what the socket does not take
    is queued and ``on_blocked`` asks the I/O loop to call ``flush`` when it is writable.
    ``on_failed`` is called (once) when the connection must end: the peer is gone, or more
    than ``max_bytes`` are still queued after offering them to the socket.
    """

    def __init__(self, sock: socket.socket, *, max_bytes: int = OUTPUT_MAX_BYTES,
                 on_blocked: Callable[[], None], on_failed: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic):
        self._sock = sock
        self._max_bytes = max_bytes
        self._on_blocked = on_blocked
        self._on_failed = on_failed
        self._clock = clock
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._lock = threading.Lock()
        self._failed = False
        self._closed = False
        self._corked = False  # a thread holds our queue for a while (see ``corked``)
        self._waiting = False  # on_blocked was called and no flush has emptied us since
        self._stuck_since: float | None = None  # queue non-empty and no byte taken since
        # Set once TLS is up; applied under the lock so records go out in the order made.
        self.encrypt: Callable[[bytes], bytes] | None = None

    @property
    def pending(self) -> int:
        """Bytes queued, not yet taken by the socket."""
        return self._queued

    def stalled_for(self, now: float) -> float:
        """Seconds the socket has taken none of what is queued (0 if nothing is)."""
        since = self._stuck_since
        return 0.0 if since is None or not self._queue else now - since

    def write(self, data: bytes, *, raw: bool = False) -> bool:
        """Send or queue ``data``; False if the connection is over (or now dropped).

        ``raw`` skips encryption (TLS handshake records and alerts).
        """
        return self._write(data, None, raw)

    def write_pending(self, take: Callable[[], bytes]) -> bool:
        """Write what ``take()`` returns, calling it under the lock: TLS records that a read
        produced (``TlsSession.take_outgoing``) then go out before any record encrypted
        after them."""
        return self._write(b"", take, True)

    def _write(self, data: bytes, produce: Callable[[], bytes] | None, raw: bool) -> bool:
        """``data``, or what ``produce()`` returns under the lock if it is given."""
        with self._lock:
            if self._failed or self._closed:
                return False
            if produce is not None:
                data = produce()
            if self.encrypt is not None and not raw:
                data = self.encrypt(data)
            if not data:
                return True
            held = getattr(_corks, "held", None)
            if held is not None and not self._queue and not self._corked:
                self._corked = True
                held.append(self)
            self._queue.append(data)
            self._queued += len(data)
            if self._stuck_since is None:
                self._stuck_since = self._clock()
            if self._corked and self._queued < WRITE_BATCH_BYTES:
                return True  # the corking thread sends it, with what follows
            failed = self._send_locked()
            if not failed and self._queued > self._max_bytes:
                log.warning("dropping a connection that does not read (%d bytes queued)",
                            self._queued)
                failed = self._fail()
            blocked = not failed and self._ask_loop_locked()
        if failed:
            self._on_failed()
            return False
        if blocked:
            self._on_blocked()
        return True

    def uncork(self) -> None:
        """Send what a ``corked`` block held (or leave it for the loop, like ``write``)."""
        with self._lock:
            self._corked = False
            failed = self._send_locked()
            blocked = not failed and self._ask_loop_locked()
        if failed:
            self._on_failed()
        elif blocked:
            self._on_blocked()

    def flush(self) -> bool:
        """Send what is queued, as far as the socket takes it; True once nothing is left."""
        with self._lock:
            failed = self._send_locked()
            done = not self._queue
            if done:
                self._waiting = False
        if failed:
            self._on_failed()
        return done

    def close(self) -> None:
        """No more writes; the owner closes the socket after this."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._queued = 0

    def _ask_loop_locked(self) -> bool:
        """Whether the loop must be asked to flush when writable (lock held): something is
        left, no corking thread will send it, and the loop has not been asked already."""
        if not self._queue or self._corked or self._waiting:
            return False
        self._waiting = True
        return True

    def _send_locked(self) -> bool:
        """Offer the queue to the socket (lock held); True if the connection just failed."""
        while self._queue and not self._failed and not self._closed:
            if len(self._queue) == 1:  # the common case: one reply, written as it comes
                data = self._queue.popleft()
            else:
                batch, size = [], 0
                while self._queue and size < WRITE_BATCH_BYTES:
                    chunk = self._queue.popleft()
                    batch.append(chunk)
                    size += len(chunk)
                data = b"".join(batch) if len(batch) > 1 else batch[0]
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:  # the peer is gone
                return self._fail()
            if sent:
                self._queued -= sent
                self._stuck_since = self._clock() if sent < len(data) else None
            if sent < len(data):
                self._queue.appendleft(data[sent:])
                return False
        return False

    def _fail(self) -> bool:
        """Give up on the connection (call with the lock held); True the first time."""
        if self._failed:
            return False
        self._failed = True
        self._queue.clear()
        self._queued = 0
        try:  # unblocks the peer and ends our reads; the owner closes the socket
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return True


class ReplyQueue:
    """A connection's replies, in the order of its requests, though some complete later.

    A send is answered when its commit is done, on the writer's thread, while the
    connection's next requests go on being read; a reply waits here until every earlier
    request has its reply, then all that are ready are written in order, in one write.
    """

    def __init__(self, write: Callable[[bytes], bool]):
        self._write = write
        self._slots: deque[list] = deque()
        self._lock = threading.Lock()
        self._waiter: tuple[int, Callable[[], None]] | None = None
        self._held = False  # in the current corked block's list (see ``fill``)

    @property
    def outstanding(self) -> int:
        """Requests whose replies are reserved and not yet written."""
        return len(self._slots)

    def reply(self, frame: bytes) -> None:
        """A reply that is ready now."""
        with self._lock:
            if not self._slots:
                self._write(frame)
            else:
                self._slots.append([frame])

    def reserve(self) -> list:
        """A place for a reply that will come later (``fill`` it)."""
        slot: list = [None]
        with self._lock:
            self._slots.append(slot)
        return slot

    def fill(self, slot: list, frame: bytes) -> None:
        """The reply of a reserved slot: written with the ready ones after it, once every
        earlier slot is filled. Inside a ``corked`` block only recorded, and written (all of
        this block's for this connection together) when the block ends."""
        held = getattr(_corks, "held", None)
        if held is not None:
            # Only the corking thread sets or clears _held; a slot's frame is set once, by
            # one thread, and read under the lock (by whoever writes it out).
            slot[0] = frame
            if not self._held:
                self._held = True
                held.append(self)
            return
        with self._lock:
            slot[0] = frame
            waiter = self._write_ready_locked()
        if waiter is not None:
            waiter()

    def uncork(self) -> None:
        """Write the replies a ``corked`` block filled (see ``fill``)."""
        self._held = False
        with self._lock:
            waiter = self._write_ready_locked()
        if waiter is not None:
            waiter()

    def _write_ready_locked(self) -> Callable[[], None] | None:
        """Write the filled slots at the head, in one write (lock held); return the waiter
        to call (outside the lock) if fewer replies are now outstanding than it waits for."""
        slots = self._slots
        if not slots or slots[0][0] is None:
            return None
        ready = [slots.popleft()[0]]
        while slots and slots[0][0] is not None:
            ready.append(slots.popleft()[0])
        self._write(b"".join(ready) if len(ready) > 1 else ready[0])
        if self._waiter is not None and len(slots) < self._waiter[0]:
            waiter, self._waiter = self._waiter[1], None
            return waiter
        return None

    def call_when_below(self, limit: int, callback: Callable[[], None]) -> bool:
        """True if ``limit`` or more replies are outstanding: ``callback`` is then called
        (on the thread that fills) once fewer are. False, and no call, if already fewer."""
        with self._lock:
            if len(self._slots) < limit:
                return False
            self._waiter = (limit, callback)
            return True


class Session(Protocol):
    """What the registry needs of a connection."""

    def push_frame(self, frame: bytes) -> bool: ...

    def account_deleted(self, frame: bytes) -> None: ...

    def password_reset(self, version: int, frame: bytes) -> bool: ...


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
        # Most recipients are offline: answered without the lock (a dict lookup is atomic),
        # which is as current as taking it, since the set may change right after anyway.
        if account_id not in self._by_account:
            return []
        with self._lock:
            return list(self._by_account.get(account_id, ()))

    def is_online(self, account_id: int) -> bool:
        with self._lock:
            return account_id in self._by_account

    def online_account_ids(self) -> list[int]:
        with self._lock:
            return list(self._by_account)
