"""Prometheus metrics of a running server (names documented in docs/OPERATIONS.md).

Each server has its own registry, so several servers in one process (tests) do not mix
their numbers; ``serve_metrics`` exposes it over HTTP on 127.0.0.1 only.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString


class _ComputedCounter:
    """A counter whose value is computed at scrape time (a custom collector)."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry):
        self.name = name
        self.documentation = documentation
        registry.register(self)

    @property
    def value(self) -> float:
        raise NotImplementedError

    def collect(self):
        family = CounterMetricFamily(self.name.removesuffix("_total"), self.documentation)
        family.add_metric([], self.value)
        yield family

    def describe(self):
        return [CounterMetricFamily(self.name.removesuffix("_total"), self.documentation)]


class FastCounter(_ComputedCounter):
    """A counter for the per-message hot path: each thread adds to a cell of its own (no
    lock per increment), and a scrape sums the cells. prometheus_client's Counter takes a
    lock and checks its state on every ``inc``: microseconds that add up per message."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry):
        self._cells: list[list[int]] = []
        self._local = threading.local()
        self._lock = threading.Lock()
        super().__init__(name, documentation, registry)

    def inc(self, amount: int = 1) -> None:
        try:
            cell = self._local.cell
        except AttributeError:
            cell = self._local.cell = [0]
            with self._lock:
                self._cells.append(cell)
        cell[0] += amount

    @property
    def value(self) -> int:
        with self._lock:
            return sum(cell[0] for cell in self._cells)


class FastHistogram:
    """A histogram for the per-commit hot path, as FastCounter is a counter: each thread
    counts into a cell of its own (bucket counts and a sum; no lock per observation), and a
    scrape adds the cells up. prometheus_client's Histogram takes a lock and walks its
    buckets in Python on every ``observe``."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...],
                 registry: CollectorRegistry):
        self.name = name
        self.documentation = documentation
        self._bounds = tuple(sorted(float(b) for b in buckets))  # upper bounds; +Inf implied
        self._cells: list[list] = []
        self._local = threading.local()
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, value: float) -> None:
        try:
            cell = self._local.cell
        except AttributeError:
            # A count per bucket (the last one +Inf), then the sum.
            cell = self._local.cell = [0] * (len(self._bounds) + 1) + [0.0]
            with self._lock:
                self._cells.append(cell)
        cell[bisect_left(self._bounds, value)] += 1  # the first bucket with value <= le
        cell[-1] += value

    def collect(self):
        with self._lock:
            cells = [list(cell) for cell in self._cells]
        counts = [sum(column) for column in zip(*cells)] or [0] * (len(self._bounds) + 2)
        total = counts.pop()
        labels = [floatToGoString(b) for b in self._bounds] + ["+Inf"]
        yield HistogramMetricFamily(self.name, self.documentation,
                                    buckets=list(zip(labels, accumulate(counts))),
                                    sum_value=total)

    def describe(self):
        return [HistogramMetricFamily(self.name, self.documentation)]


class CallbackCounter(_ComputedCounter):
    """A counter kept by someone else (a running total), read through ``read()``."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry,
                 read: Callable[[], float]):
        self._read = read
        super().__init__(name, documentation, registry)

    @property
    def value(self) -> float:
        return self._read()


class Metrics:
    """The counters, gauges and histograms the server updates."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("chat_open_connections", "Open client connections.", registry=r)
        self.connections_total = Counter("chat_connections_total", "Connections accepted.",
                                         registry=r)
        self.logins = Counter("chat_logins_total", "Login attempts by result.", ["result"],
                              registry=r)
        self.stored = FastCounter("chat_messages_stored_total",
                                  "Messages committed to the database.", r)
        self.pushed = FastCounter("chat_messages_pushed_total",
                                  "Pushes queued to live sessions.", r)
        self.acknowledged = Counter("chat_messages_acknowledged_total",
                                    "Messages acknowledged by their recipient (and deleted).",
                                    registry=r)
        self.rejected = Counter("chat_messages_rejected_total", "Sends refused, by error code.",
                                ["reason"], registry=r)
        self.undelivered = Gauge("chat_undelivered_messages",
                                 "Messages stored and not yet acknowledged.", registry=r)
        self.commit_seconds = FastHistogram(
            "chat_commit_seconds", "Duration of one group commit (statements and sync).",
            (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5), r)
        self.commit_batch = FastHistogram(
            "chat_commit_batch_jobs", "Write jobs sharing one commit.",
            (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), r)

    def observe_commit(self, jobs: int, seconds: float) -> None:
        self.commit_seconds.observe(seconds)
        self.commit_batch.observe(jobs)

    def track_polling(self, seconds: Callable[[], float]) -> None:
        """Expose the I/O loop's total time spent polling for events (see eventloop.py)."""
        CallbackCounter("chat_loop_polling_seconds_total",
                        "Time the I/O loop spent polling for the next request instead of "
                        "sleeping.", self.registry, seconds)

    def track_undelivered(self, count: Callable[[], int], max_age: float = 5.0) -> None:
        """Compute the undelivered gauge at scrape time, at most once per ``max_age`` seconds."""
        cache = {"at": -max_age, "value": 0}

        def value() -> float:
            now = time.monotonic()
            if now - cache["at"] >= max_age:
                try:
                    cache["value"] = count()
                except Exception:  # a scrape must not fail because the database is busy
                    pass
                cache["at"] = now
            return cache["value"]

        self.undelivered.set_function(value)


def serve_metrics(metrics: Metrics, port: int, host: str = "127.0.0.1") -> int:
    """Expose ``/metrics`` on host:port (0 = any free port); return the bound port."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server.server_address[1]
