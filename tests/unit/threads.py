"""Running one function on several threads at once, for tests of thread-safe counters."""

from __future__ import annotations

import threading
from collections.abc import Callable

WAIT = 10  # seconds; a bound on hangs only


def run_on_threads(work: Callable[[int], None], threads: int) -> None:
    """Run ``work(k)`` on ``threads`` threads, k = 0..threads-1, started together (a
    barrier); returns once every one has finished."""
    barrier = threading.Barrier(threads)

    def start(k: int) -> None:
        barrier.wait(WAIT)
        work(k)

    workers = [threading.Thread(target=start, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(WAIT)
    assert not any(worker.is_alive() for worker in workers)
