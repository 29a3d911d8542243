"""A small selector loop: one thread multiplexes many sockets; other threads post to it.

Why not a thread per connection: with thousands of connections, thousands of runnable Python
threads fight over the GIL (each waiter wakes every switch interval to ask for it), and each
costs a stack. One I/O thread waiting in ``epoll`` costs nothing per idle connection.

Why not asyncio: the server's other threads (the database writer, the worker pool) hand
results back many thousands of times a second; ``call_soon`` here is a deque append plus at
most one wake-up byte per loop turn, and no coroutine machinery sits on the hot path.
Everything except :meth:`call_soon` and :meth:`stop` must be called on the loop's thread.

Why the loop may poll before it sleeps (``busy_poll``): on this kind of machine (a VM),
waking a thread blocked in ``epoll_wait`` costs ~30 us, half of a loopback round trip.
When the next request comes within microseconds of the last reply (a client waiting for each
reply), polling the selector until it comes saves that wake-up. :class:`PollWindow` adapts
how long to poll, as KVM's halt polling does, so a server whose clients are slow or idle
sleeps at once and spends nothing on it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE


class Timer:
    """A pending :meth:`EventLoop.call_later`; ``cancel()`` it to drop it."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]):
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class PollWindow:
    """How long the loop polls before it sleeps: grown while waits end within ``maximum``
    seconds, halved (down to none) by each wait longer than that."""

    __slots__ = ("current", "maximum", "minimum")

    def __init__(self, maximum: float):
        self.maximum = maximum
        self.minimum = maximum / 8
        self.current = 0.0

    def observe(self, waited: float) -> None:
        """Adapt to one wait of ``waited`` seconds (polling included)."""
        if waited <= self.current:  # polling paid off
            return
        if waited <= self.maximum:  # polling longer would have: double it
            self.current = min(self.maximum, max(self.current * 2, self.minimum))
        elif self.current / 2 >= self.minimum:
            self.current /= 2
        else:
            self.current = 0.0


class EventLoop:
    """Readiness callbacks for registered sockets, timers, and thread-safe ``call_soon``.

    With ``busy_poll`` seconds > 0, a turn that would sleep first polls for up to that long
    (adapted by :class:`PollWindow`), and only while ``may_poll()`` says no other thread of
    the process needs the GIL (polling holds it between its system calls)."""

    def __init__(self, *, busy_poll: float = 0.0,
                 may_poll: Callable[[], bool] = lambda: True) -> None:
        self._selector = selectors.DefaultSelector()
        self._ready: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, Timer]] = []
        self._sequence = itertools.count()
        self._wake_recv, self._wake_send = socket.socketpair()
        self._wake_recv.setblocking(False)
        self._wake_send.setblocking(False)
        self._wake_pending = False
        self._selector.register(self._wake_recv, READ, self._drain_wakeups)
        self._running = False
        self._stop_requested = False
        self.ready_count = 0  # sockets that were ready in this turn
        self._turn_end: list[Callable[[], None]] = []
        self.thread_id: int | None = None
        self._poll = PollWindow(busy_poll) if busy_poll > 0 else None
        self._may_poll = may_poll
        self.polled_seconds = 0.0  # total time spent polling (read by metrics)

    # -- from any thread ------------------------------------------------------------------

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop's thread at its next turn (thread-safe)."""
        self._ready.append(callback)
        if threading.get_ident() != self.thread_id and not self._wake_pending:
            self._wake_pending = True
            try:
                self._wake_send.send(b"\0")
            except (BlockingIOError, OSError):  # full: a wake-up is already pending
                pass

    def stop(self) -> None:
        """Make :meth:`run` return after the current turn (thread-safe)."""
        self.call_soon(self._request_stop)

    # -- on the loop's thread -------------------------------------------------------------

    def register(self, sock, events: int, callback: Callable[[int], None]) -> None:
        self._selector.register(sock, events, callback)

    def modify(self, sock, events: int, callback: Callable[[int], None]) -> None:
        self._selector.modify(sock, events, callback)

    def unregister(self, sock) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):  # never registered, or already closed
            pass

    def at_turn_end(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` at the end of every turn, after the turn's socket, timer and
        ``call_soon`` callbacks: for work that the turn's callbacks collect and that costs
        less done once (the server commits a turn's sends together)."""
        self._turn_end.append(callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + delay, callback)
        heapq.heappush(self._timers, (timer.when, next(self._sequence), timer))
        return timer

    def run(self) -> None:
        """Serve until :meth:`stop`. A callback that raises is logged, never fatal."""
        self.thread_id = threading.get_ident()
        self._running = True
        select = self._selector.select
        try:
            while not self._stop_requested:
                timeout = self._timeout()
                if timeout == 0 or self._poll is None:
                    events = select(timeout)
                else:
                    events = self._wait(timeout)
                self.ready_count = len(events)
                for key, mask in events:
                    self._call(key.data, mask)
                self._run_timers()
                ready = self._ready
                for _ in range(len(ready)):  # those posted meanwhile wait for the next turn
                    self._call(ready.popleft())
                for callback in self._turn_end:
                    self._call(callback)
        finally:
            self._running = False

    def close(self) -> None:
        self._selector.close()
        self._wake_recv.close()
        self._wake_send.close()

    # -- internals ------------------------------------------------------------------------

    def _timeout(self) -> float | None:
        if self._ready or self._stop_requested:
            return 0
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return None
        return max(0.0, self._timers[0][0] - time.monotonic())

    def _wait(self, timeout: float | None) -> list:
        """Wait for events: poll for the current window, then sleep for the rest."""
        select = self._selector.select
        clock = time.perf_counter
        start = clock()
        events = None
        window = self._poll.current
        if window and self._may_poll():
            deadline = start + (window if timeout is None else min(window, timeout))
            while True:
                events = select(0)
                if events or clock() >= deadline:
                    break
            self.polled_seconds += clock() - start
        if not events:
            events = select(None if timeout is None
                            else max(0.0, timeout - (clock() - start)))
        self._poll.observe(clock() - start)
        return events

    def _run_timers(self) -> None:
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)[2]
            if not timer.cancelled:
                self._call(timer.callback)

    def _drain_wakeups(self, _mask: int) -> None:
        try:
            while self._wake_recv.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        # Cleared after draining (a byte sent during the drain must not be read while the
        # flag stays set: later posts would never wake us), and before this turn's ready
        # callbacks run, so anything posted from now on sends a new wake-up byte.
        self._wake_pending = False

    def _request_stop(self) -> None:
        self._stop_requested = True

    @staticmethod
    def _call(callback, *args) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("error in the I/O loop (the loop goes on)")
