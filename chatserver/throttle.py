"""Login and registration throttling, with an injected clock so tests never sleep.

Failed logins are counted per account name and per client address. A few failures are free
(typos happen); after that each further failure locks the key out for twice as long as the
previous one, up to a cap. Lockouts are refusals with a retry-after, not sleeps, so an
attacker cannot tie up server threads by failing on purpose.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

MAX_TRACKED_KEYS = 100_000  # beyond this, stale entries are forgotten (bounds memory)


@dataclass
class _Failures:
    count: int
    last: float
    locked_until: float


class FailureThrottle:
    """Growing lockouts after repeated failures, per key.

    ``free_failures`` failures in a row cost nothing; the next one locks the key for
    ``base_delay`` seconds, the one after for twice that, and so on up to ``max_delay``.
    Failures older than ``forget_after`` seconds are forgotten. ``free_failures < 0``
    disables the throttle.
    """

    def __init__(self, free_failures: int = 5, base_delay: float = 1.0, max_delay: float = 300.0,
                 forget_after: float = 900.0, clock: Callable[[], float] = time.monotonic):
        self.free_failures = free_failures
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.forget_after = forget_after
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[Hashable, _Failures] = {}

    @property
    def enabled(self) -> bool:
        return self.free_failures >= 0

    def locked_for(self, key: Hashable) -> float:
        """Seconds until ``key`` may try again; 0.0 if it may now."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        with self._lock:
            entry = self._keys.get(key)
            if entry is None:
                return 0.0
            if now - entry.last > self.forget_after:
                del self._keys[key]
                return 0.0
            return max(0.0, entry.locked_until - now)

    def failure(self, key: Hashable) -> None:
        if not self.enabled:
            return
        now = self._clock()
        with self._lock:
            entry = self._keys.get(key)
            if entry is None or now - entry.last > self.forget_after:
                entry = self._keys[key] = _Failures(0, now, now)
            entry.count += 1
            entry.last = now
            over = entry.count - self.free_failures
            if over > 0:
                delay = min(self.max_delay, self.base_delay * 2 ** min(over - 1, 32))
                entry.locked_until = now + delay
            if len(self._keys) > MAX_TRACKED_KEYS:
                self._forget_stale(now)

    def success(self, key: Hashable) -> None:
        with self._lock:
            self._keys.pop(key, None)

    def _forget_stale(self, now: float) -> None:
        for key, entry in list(self._keys.items()):
            if now - entry.last > self.forget_after and entry.locked_until <= now:
                del self._keys[key]
