"""FastHistogram: per-thread cells summed at scrape time, exposed as a Prometheus histogram."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from chatserver.metrics import FastHistogram, Metrics

from .threads import run_on_threads


def samples(registry: CollectorRegistry, family_name: str) -> dict[str, float]:
    """The samples of one family in the text exposition: name{le="..."} -> value."""
    text = generate_latest(registry).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        if family.name == family_name:
            assert family.type == "histogram"
            for s in family.samples:
                le = s.labels.get("le")
                found[f'{s.name}{{le="{le}"}}' if le else s.name] = s.value
    return found


def test_observations_land_in_cumulative_buckets_with_count_and_sum():
    """A value equal to a bound counts in that bound's bucket (le: less or equal); one
    above every bound only in +Inf."""
    registry = CollectorRegistry()
    histogram = FastHistogram("test_seconds", "Durations.", (0.5, 1, 2), registry)
    for value in (0.1, 0.5, 0.7, 1, 3, 100):
        histogram.observe(value)
    assert samples(registry, "test_seconds") == {
        'test_seconds_bucket{le="0.5"}': 2,
        'test_seconds_bucket{le="1.0"}': 4,
        'test_seconds_bucket{le="2.0"}': 4,
        'test_seconds_bucket{le="+Inf"}': 6,
        "test_seconds_count": 6,
        "test_seconds_sum": 105.3,
    }


def test_an_unobserved_histogram_is_exposed_empty():
    registry = CollectorRegistry()
    FastHistogram("test_jobs", "Jobs.", (1, 2), registry)
    assert samples(registry, "test_jobs") == {
        'test_jobs_bucket{le="1.0"}': 0, 'test_jobs_bucket{le="2.0"}': 0,
        'test_jobs_bucket{le="+Inf"}': 0, "test_jobs_count": 0, "test_jobs_sum": 0}


def test_observations_from_many_threads_are_all_counted():
    """Each thread has its own cell; cells of threads that have ended still count."""
    registry = CollectorRegistry()
    histogram = FastHistogram("test_jobs", "Jobs.", (1, 10), registry)
    threads, per_thread = 8, 3000

    def work(_k: int) -> None:
        for i in range(per_thread):
            histogram.observe(1 if i % 3 else 5)

    run_on_threads(work, threads)
    histogram.observe(50)  # this thread's own cell adds to theirs
    found = samples(registry, "test_jobs")
    ones = threads * (per_thread - per_thread // 3)
    assert found['test_jobs_bucket{le="1.0"}'] == ones
    assert found['test_jobs_bucket{le="10.0"}'] == threads * per_thread
    assert found["test_jobs_count"] == threads * per_thread + 1
    assert found["test_jobs_sum"] == ones + 5 * (threads * per_thread - ones) + 50
    # One cell per thread that observed (the point: no cell is shared, so no observation
    # can be lost; the GIL makes a shared cell's += lose one too rarely for totals to show).
    assert len(histogram._cells) == threads + 1


def test_the_commit_histograms_of_metrics_are_fast_histograms_of_their_own():
    first, second = Metrics(), Metrics()
    first.observe_commit(3, 0.0007)
    found = samples(first.registry, "chat_commit_batch_jobs")
    assert found['chat_commit_batch_jobs_bucket{le="2.0"}'] == 0
    assert found['chat_commit_batch_jobs_bucket{le="4.0"}'] == 1
    seconds = samples(first.registry, "chat_commit_seconds")
    assert seconds['chat_commit_seconds_bucket{le="0.0005"}'] == 0
    assert seconds['chat_commit_seconds_bucket{le="0.001"}'] == 1
    assert samples(second.registry, "chat_commit_seconds")["chat_commit_seconds_count"] == 0
