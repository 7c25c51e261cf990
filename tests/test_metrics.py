"""The Prometheus metrics route, scraped from a real uvicorn server while real clients stream."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Collection
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from helpers.apps import fast_settings, router_app, served
from helpers.redis import start_redis
from helpers.servers import serve
from helpers.streams import open_stream, raw_request, raw_stream, soft_refusal, wait_until
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fastapi_sse import BackendError, MemoryBackend, SSEService, allow_all, create_sse_router
from fastapi_sse.metrics import SSECollector
from fastapi_sse.stats import LATENCY_BUCKETS

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "metrics-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def require_token(authorization: str | None = Header(None)) -> None:
    if authorization != f"Bearer {TOKEN}":
        raise HTTPException(401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"})


def identify(request: Request) -> str | None:
    return request.headers.get("x-user")


def metrics_app(**settings: Any) -> FastAPI:
    return router_app(fast_settings(**settings), identify=identify, metrics_dependencies=[Depends(require_token)])


class Scrape:
    """One scrape of the metrics route, parsed by prometheus-client's own parser."""

    def __init__(self, text: str, worker: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                assert sample.labels.get("worker") == worker, sample
                labels = frozenset((k, v) for k, v in sample.labels.items() if k != "worker")
                self.samples[(sample.name, labels)] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def labels_of(self, name: str) -> set[frozenset[tuple[str, str]]]:
        return {labels for sample, labels in self.samples if sample == name}


def scrape(url: str, sse: SSEService, path: str = "/metrics") -> Scrape:
    response = httpx.get(url + path, headers=AUTH, timeout=5)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text, sse.worker_id)


def check_histogram(metrics: Scrape, most: int) -> float:
    """The latency histogram is well formed; returns its sample count."""
    name = "fastapi_sse_write_latency_seconds"
    bounds = [*(repr(b) for b in LATENCY_BUCKETS), "+Inf"]
    counts = [metrics(name + "_bucket", le=le) for le in bounds]
    assert counts == sorted(counts), counts
    count = metrics(name + "_count")
    assert counts[-1] == count
    assert 1 <= count <= most
    assert metrics(name + "_sum") >= 0
    return count


def test_metrics_match_what_was_sent_to_several_clients() -> None:
    events = 300
    with served(metrics_app()) as (srv, sse):
        with contextlib.ExitStack() as stack:
            clients = [stack.enter_context(raw_stream(srv.port, "/subscribe?channel=load")) for _ in range(3)]
            # The response head means the handler returned: every client is subscribed.
            live = scrape(srv.url, sse)
            assert live("fastapi_sse_connections") == 3
            assert live("fastapi_sse_channels") == 1

            def publish() -> None:
                for i in range(events):
                    sse.broadcast("load", "tick", {"i": i, "pad": "x" * (i % 7)})

            srv.call(publish)
            last = b'data: {"i":%d,"pad":"%s"}\n\n' % (events - 1, b"x" * ((events - 1) % 7))
            received = [client.read_until(last) for client in clients]
            for body in received:
                assert body.count(b"event: tick\n") == events
        wait_until(lambda: srv.call(sse.stats).disconnects.get("client_closed") == 3, message="3 disconnects")

        metrics = scrape(srv.url, sse)
        stats = srv.call(sse.stats)
    assert metrics("fastapi_sse_connections") == 0
    assert metrics("fastapi_sse_connects_total") == 3 == stats.connects
    assert metrics("fastapi_sse_events_published_total") == events == stats.events_published
    assert metrics("fastapi_sse_events_sent_total") == 3 * events == stats.events_sent
    # Every byte each client read was counted: openings, events, nothing else (no heartbeat).
    assert metrics("fastapi_sse_bytes_sent_total") == sum(map(len, received)) == stats.bytes_sent
    assert metrics("fastapi_sse_disconnects_total", reason="client_closed") == 3
    for reason in ("removed", "replaced", "slow_consumer", "shutdown", "never_started", "backend_gap"):
        assert metrics("fastapi_sse_disconnects_total", reason=reason) == 0
    assert metrics("fastapi_sse_events_dropped_total", reason="drop_oldest") == 0
    assert metrics("fastapi_sse_resumes_total") == 0
    assert metrics("fastapi_sse_publish_failures_total") == 0
    assert metrics("fastapi_sse_info", backend="memory", overflow_policy="disconnect") == 1
    check_histogram(metrics, 3 * events)


@pytest.mark.parametrize("policy", ["disconnect", "drop_newest"])
def test_slow_consumer_is_counted(policy: str) -> None:
    with served(metrics_app(max_buffer_bytes=1024, overflow_policy=policy)) as (srv, sse):
        # A client that never reads, with a tiny receive buffer: the server's writes
        # block, then its buffer overflows.
        sock, _ = raw_request(srv.port, "/subscribe?channel=slow", rcvbuf=4096)
        with sock:

            async def publish() -> None:
                for _ in range(200):
                    sse.broadcast("slow", "chunk", "x" * 900)  # each fits the buffer alone
                    await asyncio.sleep(0)  # the stream's writer takes its turn

            def overflowed() -> bool:
                srv.call(publish)
                stats = srv.call(sse.stats)
                buffered = sum(c.buffered_bytes for c in srv.call(sse.get_clients))
                return bool(stats.slow_consumer_disconnects or (stats.events_dropped and buffered))

            wait_until(overflowed, timeout=20, message="the slow client's buffer to overflow")
            metrics = scrape(srv.url, sse)
            stats = srv.call(sse.stats)
    if policy == "disconnect":
        assert metrics("fastapi_sse_disconnects_total", reason="slow_consumer") == 1
        assert metrics("fastapi_sse_connections") == 0
        assert metrics("fastapi_sse_events_dropped_total", reason="drop_newest") == 0
    else:
        assert metrics("fastapi_sse_disconnects_total", reason="slow_consumer") == 0
        assert metrics("fastapi_sse_events_dropped_total", reason="drop_newest") == stats.events_dropped >= 1
        assert metrics("fastapi_sse_buffered_bytes") > 0
    assert metrics("fastapi_sse_events_published_total") == stats.events_published


def test_resumes_replayed_and_with_gap() -> None:
    with served(metrics_app(history_size=2)) as (srv, sse):
        for i in range(5):
            srv.call(sse.broadcast, "h", "n", i)  # ids 1..5; history keeps 4 and 5
        resume = {"Last-Event-ID": "4"}
        with open_stream(srv.url + "/subscribe", params={"channel": "h"}, headers=resume, opened=False) as stream:
            assert [(e.id, e.data) for e in stream.events(1)] == [("5", "4")]
        with open_stream(srv.url + "/subscribe", params={"channel": "h", "last_event_id": "1"}, opened=False) as stream:
            gap = stream.until_event("gap")[-1]
            assert '"channels":["h"]' in gap.data
        metrics = scrape(srv.url, sse)
    assert metrics("fastapi_sse_resumes_total") == 2
    assert metrics("fastapi_sse_resume_gaps_total") == 1


def test_metrics_route_is_protected_and_optional() -> None:
    with served(metrics_app(max_connections_per_identity=1, identity_limit_policy="refuse")) as (srv, sse):
        assert httpx.get(srv.url + "/metrics").status_code == 401
        assert httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert srv.app.url_path_for("fastapi_sse:metrics") == "/metrics"
        with open_stream(srv.url + "/subscribe", headers={"X-User": "ann"}):
            refused = httpx.get(srv.url + "/subscribe", headers={"X-User": "ann"}, timeout=5)
            assert "max_connections_per_identity" in soft_refusal(refused)
        metrics = scrape(srv.url, sse)
    assert metrics("fastapi_sse_refused_total", limit="max_connections_per_identity") == 1
    assert metrics("fastapi_sse_refused_total", limit="max_connections") == 0
    # Without dependencies there is no metrics route at all.
    with served(router_app()) as (srv, _):
        assert httpx.get(srv.url + "/metrics", headers=AUTH).status_code == 404


def test_metrics_path_is_configurable() -> None:
    app = FastAPI()
    router = create_sse_router(
        fast_settings(), authorize=allow_all, metrics_dependencies=[Depends(require_token)], metrics_path="/m"
    )
    app.include_router(router, prefix="/sse")
    with served(app) as (srv, sse):
        assert scrape(srv.url, sse, "/sse/m")("fastapi_sse_connections") == 0


class FlakyBackend(MemoryBackend):
    """A memory backend whose store goes away after a while, as a remote one's can."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def publish(
        self,
        channel: str,
        payload: bytes,
        event_id: str | None,
        *,
        store: bool,
        index: Collection[str] = (),
        history: int | None = None,
    ) -> Any:
        if self.down:
            self.errors += 1  # its own retry before giving up
            raise ConnectionError("store unreachable")
        return await super().publish(channel, payload, event_id, store=store, index=index, history=history)

    async def listen(self, channels: Collection[str]) -> None:
        return None


@pytest.mark.anyio
async def test_backend_errors_and_reconnects_are_exported() -> None:
    backend = FlakyBackend()
    async with SSEService(fast_settings(), backend=backend) as sse:
        registry = CollectorRegistry()
        registry.register(SSECollector(sse))
        await sse.publish("c", "e", 1)
        backend.down = True
        with pytest.raises(BackendError, match="store unreachable"):
            await sse.publish("c", "e", 2)
        backend.reconnects += 1
        metrics = Scrape(generate_latest(registry).decode(), sse.worker_id)
    assert metrics("fastapi_sse_events_published_total") == 1
    assert metrics("fastapi_sse_publish_failures_total") == 1
    # One error raised to the service, one the backend counted itself.
    assert metrics("fastapi_sse_backend_errors_total") == 2
    assert metrics("fastapi_sse_backend_reconnects_total") == 1


def test_redis_outage_shows_in_backend_metrics() -> None:
    redis = start_redis()
    try:
        app = metrics_app(
            backend="redis",
            redis_url=redis.url,
            redis_key_prefix=f"metrics-{uuid.uuid4().hex[:8]}:",
            redis_max_backoff=0.2,
            redis_timeout=1.0,
        )
        with served(app) as (srv, sse), open_stream(srv.url + "/subscribe", params={"channel": "r"}):
            before = scrape(srv.url, sse)
            assert before("fastapi_sse_backend_errors_total") == 0
            assert before("fastapi_sse_info", backend="redis", overflow_policy="disconnect") == 1

            redis.proc.kill()
            redis.proc.wait(10)
            srv.call(sse.broadcast, "r", "while-down", 1)
            down = wait_until(
                lambda: (m := scrape(srv.url, sse))("fastapi_sse_backend_errors_total") >= 1 and m,
                message="the lost connection to count as a backend error",
            )
            assert down("fastapi_sse_pending_publishes") == 1
            assert down("fastapi_sse_backend_reconnects_total") == 0

            redis = start_redis(redis.port, redis.dir)
            up = wait_until(
                lambda: (
                    (m := scrape(srv.url, sse))("fastapi_sse_backend_reconnects_total") >= 1
                    and m("fastapi_sse_pending_publishes") == 0
                    and m
                ),
                message="the backend to reconnect and drain its outbox",
            )
            backend = sse.backend
            assert up("fastapi_sse_backend_reconnects_total") == backend.reconnects
            assert up("fastapi_sse_backend_errors_total") == sse.counters.backend_errors + backend.errors
    finally:
        redis.proc.kill()
        redis.proc.wait(10)


def test_docs_example_mounts_a_protected_route(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "docs" / "metrics.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "docs/metrics.md shows how to mount the route"
    monkeypatch.setenv("METRICS_TOKEN", TOKEN)
    namespace: dict[str, Any] = {}
    exec(compile(blocks[0], "docs/metrics.md", "exec"), namespace)
    app = namespace["app"]
    with serve(app) as srv:
        assert httpx.get(srv.url + "/sse/metrics").status_code in (401, 403)
        response = httpx.get(srv.url + "/sse/metrics", headers=AUTH)
        assert response.status_code == 200
        assert "fastapi_sse_connections{" in response.text
