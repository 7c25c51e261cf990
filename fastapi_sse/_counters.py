"""The service's running totals, which stats and metrics report."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter

from fastapi_sse._names import is_internal
from fastapi_sse._registry import Registry
from fastapi_sse.client import DisconnectReason
from fastapi_sse.stats import LATENCY_BUCKETS, ConnectionStats


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

    def sent(self, events: int, size: int, created: float = 0.0) -> None:
        """Count a write; ``created`` is its oldest event's arrival time, if known."""
        self.events_sent += events
        self.bytes_sent += size
        if created:
            self.observe_latency(time.monotonic() - created)

    def observe_latency(self, seconds: float) -> None:
        """Count one publish-to-write latency sample."""
        self.latency_buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds


def snapshot(
    counters: Counters,
    registry: Registry,
    *,
    worker_id: str,
    backend: str,
    pending: int,
    streaming: int,
) -> ConnectionStats:
    """One worker's :class:`ConnectionStats` from its totals and its clients."""
    clients = list(registry)
    return ConnectionStats(
        scope="worker",
        worker_id=worker_id,
        backend=backend,
        total_connections=len(clients),
        by_channel={c: len(m) for c, m in registry.channels.items() if not is_internal(c)},
        oldest_connection=min((c.created_at for c in clients), default=None),
        connects=counters.connects,
        disconnects=dict(counters.disconnects),
        refused=dict(counters.refused),
        events_published=counters.published,
        events_sent=counters.events_sent,
        bytes_sent=counters.bytes_sent,
        events_dropped=counters.dropped,
        slow_consumer_disconnects=counters.disconnects.get(DisconnectReason.SLOW_CONSUMER, 0),
        resumes=counters.resumes,
        resume_gaps=counters.resume_gaps,
        publish_failures=counters.publish_failures,
        pending_publishes=pending,
        streaming=streaming,
    )
