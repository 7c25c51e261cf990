"""Prometheus metrics of a service, read from its counters when scraped.

Needs the ``metrics`` extra (``pip install 'fastapi-sse-channels[metrics]'``). Nothing here
runs on the publishing or writing path: the service keeps plain counters, and
:class:`SSECollector` turns them into metric families at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "fastapi_sse metrics need prometheus-client: pip install 'fastapi-sse-channels[metrics]'"
    ) from exc

from starlette.responses import Response

from fastapi_sse.client import DisconnectReason
from fastapi_sse.stats import LATENCY_BUCKETS

if TYPE_CHECKING:
    from fastapi_sse.service import SSEService

PREFIX = "fastapi_sse_"

# Reasons and limits exported at 0 from the start, so a rate() has a series to work on.
_DISCONNECT_REASONS = tuple(value for name, value in vars(DisconnectReason).items() if name.isupper())
_REFUSAL_LIMITS = ("max_connections", "max_connections_per_identity", "shutdown")
_DROP_POLICIES = ("drop_oldest", "drop_newest")


class SSECollector(Collector):
    """A Prometheus collector of one :class:`SSEService` (this worker's view).

    Every sample carries a ``worker`` label (the service's ``worker_id``), so the
    series of several workers behind one address stay apart. Register it in a
    registry of your own with ``registry.register(SSECollector(sse))`` once the
    service is running, or let :func:`create_sse_router` mount the metrics route.
    """

    def __init__(self, service: SSEService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        service = self.service
        counters = service.counters
        worker = service.worker_id
        stats = service.stats()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["worker"])
            family.add_metric([worker], value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["worker"])
            family.add_metric([worker], value)
            return family

        def by_label(name: str, doc: str, label: str, known: tuple[str, ...], values: dict[str, int]) -> Metric:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["worker", label])
            for key in sorted({*known, *values}):
                family.add_metric([worker, key], values.get(key, 0))
            return family

        info = GaugeMetricFamily(
            PREFIX + "info", "Always 1; labels describe this worker.", labels=["worker", "backend", "overflow_policy"]
        )
        info.add_metric([worker, service.settings.backend, service.settings.overflow_policy], 1)
        yield info
        yield gauge("connections", "Open streams.", stats.total_connections)
        yield gauge(
            "channels",
            "Channels with at least one open stream (internal channels excluded).",
            len(stats.by_channel),
        )
        yield gauge(
            "buffered_bytes",
            "Bytes queued for clients and not yet written.",
            sum(c.buffered_bytes for c in service.get_clients()),
        )
        yield gauge("pending_publishes", "Fire-and-forget publishes waiting for the backend.", stats.pending_publishes)
        yield counter("connects_total", "Streams opened.", counters.connects)
        yield by_label(
            "disconnects_total",
            "Streams ended, by reason.",
            "reason",
            _DISCONNECT_REASONS,
            dict(counters.disconnects),
        )
        yield by_label(
            "refused_total",
            "Connections refused, by the limit that refused them.",
            "limit",
            _REFUSAL_LIMITS,
            dict(counters.refused),
        )
        yield counter("events_published_total", "Events published through this worker.", counters.published)
        yield counter(
            "events_sent_total",
            "Events written to clients (one per client per event), replays included.",
            counters.events_sent,
        )
        yield counter(
            "bytes_sent_total",
            "Bytes written to clients: stream openings, replays, events and heartbeats.",
            counters.bytes_sent,
        )
        policy = service.settings.overflow_policy
        yield by_label(
            "events_dropped_total",
            "Events dropped from full client buffers, by overflow policy.",
            "reason",
            _DROP_POLICIES,
            {policy: counters.dropped} if counters.dropped else {},
        )
        yield counter("resumes_total", "Streams opened with a Last-Event-ID.", counters.resumes)
        yield counter(
            "resume_gaps_total",
            "Resumes whose history no longer covered the cursor (a gap event was sent).",
            counters.resume_gaps,
        )
        yield counter(
            "publish_failures_total",
            "Events lost at publish: refused by the backend or beyond publish_buffer_bytes.",
            counters.publish_failures,
        )
        backend = service.backend
        yield counter(
            "backend_errors_total",
            "Failed operations against the backend (each retry counts).",
            counters.backend_errors + backend.errors,
        )
        yield counter("backend_reconnects_total", "Connections to the backend re-established.", backend.reconnects)

        histogram = HistogramMetricFamily(
            PREFIX + "write_latency_seconds",
            "Seconds from an event reaching this worker to its write to a client, "
            "sampled on the oldest event of each write.",
            labels=["worker"],
        )
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counters.latency_buckets, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        histogram.add_metric([worker], buckets, counters.latency_sum)
        yield histogram


def metrics_registry(service: SSEService) -> CollectorRegistry:
    """A registry of this service's metrics alone (no process or global collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SSECollector(service))
    return registry


def metrics_response(service: SSEService) -> Response:
    """The Prometheus text exposition of the service's metrics, as a response."""
    return Response(generate_latest(metrics_registry(service)), media_type=CONTENT_TYPE_LATEST)


__all__ = ["SSECollector", "metrics_registry", "metrics_response"]
