"""The service's running totals, which stats and metrics report."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the write latency histogram's buckets; one more bucket holds the rest."""


class Counters:
    """Mutable totals since the service started."""

    __slots__ = (
        "backend_errors",
        "bytes_sent",
        "connects",
        "disconnects",
        "dropped",
        "events_sent",
        "latency_buckets",
        "latency_sum",
        "publish_failures",
        "published",
        "refused",
        "resume_gaps",
        "resumes",
    )

    def __init__(self) -> None:
        self.connects = 0
        self.disconnects: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.published = 0
        self.events_sent = 0
        self.bytes_sent = 0
        self.dropped = 0
        self.resumes = 0
        self.resume_gaps = 0
        self.publish_failures = 0
        self.backend_errors = 0
        # Non-cumulative counts per LATENCY_BUCKETS bound, and a last one for larger values.
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def observe_latency(self, seconds: float) -> None:
        """Count one publish-to-write latency sample."""
        self.latency_buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
