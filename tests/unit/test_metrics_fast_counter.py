"""FastCounter: per-thread cells summed at scrape time, and its place in the exposition."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from chatserver.metrics import FastCounter, Metrics

from .threads import run_on_threads

WAIT = 10  # seconds; a bound on hangs only


def sample(registry: CollectorRegistry, name: str) -> float | None:
    """The value of sample ``name`` in the registry's text exposition (None if absent)."""
    text = generate_latest(registry).decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                return s.value
    return None


def test_increments_from_many_threads_are_all_counted():
    """Concurrent inc() from several threads, including inc(amount), all add up; the cells
    of threads that have ended still count."""
    counter = FastCounter("test_events_total", "Events.", CollectorRegistry())
    threads, per_thread = 8, 5000

    def work(k: int) -> None:
        for _ in range(per_thread):
            counter.inc()
        counter.inc(k)

    run_on_threads(work, threads)
    assert counter.value == threads * per_thread + sum(range(threads))
    counter.inc(2)  # this thread's own cell adds to theirs
    assert counter.value == threads * per_thread + sum(range(threads)) + 2
    # One cell per thread that counted (the point: no increment is shared, so none can be
    # lost; the GIL makes a shared cell's += lose one too rarely for the totals to show).
    assert len(counter._cells) == threads + 1


def test_stored_counter_appears_in_the_exposition():
    """Metrics.stored is exposed as chat_messages_stored_total, a counter, with its sum
    across threads; pushed is a separate series."""
    metrics = Metrics()
    assert sample(metrics.registry, "chat_messages_stored_total") == 0
    other = threading.Thread(target=lambda: metrics.stored.inc(3))
    other.start()
    other.join(WAIT)
    metrics.stored.inc(2)
    metrics.pushed.inc()

    assert sample(metrics.registry, "chat_messages_stored_total") == 5
    assert sample(metrics.registry, "chat_messages_pushed_total") == 1
    text = generate_latest(metrics.registry).decode()
    assert "# TYPE chat_messages_stored_total counter" in text
    assert "Messages committed to the database." in text


def test_each_metrics_has_its_own_counts():
    """Two Metrics (two servers in one process) do not share FastCounter values."""
    first, second = Metrics(), Metrics()
    first.stored.inc(4)
    assert sample(first.registry, "chat_messages_stored_total") == 4
    assert sample(second.registry, "chat_messages_stored_total") == 0
