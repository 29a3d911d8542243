"""A latency histogram with bounded memory: log-linear buckets, about 1.6 % precision.

Load generators record every request here instead of keeping raw samples, then send the
histogram (a plain dict) to the parent, which merges them. The exact maximum and the sum are
kept beside the buckets.
"""

from __future__ import annotations

_SUB_BITS = 7  # 64 buckets per power of two: a bucket is at most 1/64 of its value wide
_HALF = 1 << (_SUB_BITS - 1)


def bucket_of(value: int) -> int:
    """The bucket index of a non-negative integer (nanoseconds)."""
    bits = value.bit_length()
    if bits <= _SUB_BITS:
        return value
    shift = bits - _SUB_BITS
    return shift * _HALF + (value >> shift)


def bucket_value(index: int) -> float:
    """The middle of a bucket: what a value in it is reported as."""
    if index < (1 << _SUB_BITS):
        return float(index)
    shift = index // _HALF - 1
    mantissa = index - shift * _HALF
    low = mantissa << shift
    return low + ((1 << shift) - 1) / 2


class Histogram:
    """Counts of values (nanoseconds) per bucket, plus count, sum and the exact maximum."""

    __slots__ = ("buckets", "count", "max", "total")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.total = 0
        self.max = 0

    def record(self, value: int) -> None:
        if value < 0:  # noqa: PLR1730 - plain ifs: this is the hot path
            value = 0
        index = bucket_of(value)
        buckets = self.buckets
        buckets[index] = buckets.get(index, 0) + 1
        self.count += 1
        self.total += value
        if value > self.max:  # noqa: PLR1730
            self.max = value

    def merge(self, other: Histogram) -> None:
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)

    def percentile(self, p: float) -> float | None:
        """The value below which ``p`` percent of the recorded values lie (None when empty)."""
        if not self.count:
            return None
        if p >= 100:
            return float(self.max)
        rank = max(1, -(-self.count * p // 100))  # ceil: the rank-th smallest value
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return min(bucket_value(index), float(self.max))
        return float(self.max)  # pragma: no cover - rank never exceeds count

    def count_at_most(self, value: int) -> int:
        """How many recorded values were at most ``value`` (to the bucket's precision)."""
        limit = bucket_of(value)
        return sum(n for index, n in self.buckets.items() if index <= limit)

    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def to_dict(self) -> dict:
        return {"buckets": self.buckets, "count": self.count, "total": self.total,
                "max": self.max}

    @classmethod
    def from_dict(cls, data: dict) -> Histogram:
        h = cls()
        h.buckets = {int(k): v for k, v in data["buckets"].items()}
        h.count, h.total, h.max = data["count"], data["total"], data["max"]
        return h

    def summary_ms(self) -> dict:
        """p50, p99, max and mean in milliseconds (None when empty)."""
        def ms(v):
            return None if v is None else round(v / 1e6, 4)
        return {"p50": ms(self.percentile(50)), "p99": ms(self.percentile(99)),
                "max": ms(self.max if self.count else None), "mean": ms(self.mean()),
                "samples": self.count}
