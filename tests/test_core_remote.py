"""The service's shared-backend logic (outbox, channel interest, presence, cluster-wide
identity limits, lost channels), run against an in-process backend that delivers
asynchronously like a remote one. Redis itself is covered by the backend contract suite."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from helpers.apps import fast_settings
from helpers.servers import Served, serve
from helpers.streams import open_stream, soft_refusal, wait_until

from fastapi_sse import (
    Backend,
    BackendError,
    MemoryBackend,
    Message,
    Replay,
    SSEService,
    SSESettings,
    allow_all,
    create_sse_router,
)
from fastapi_sse._wire import frame_payload
from fastapi_sse.backends.base import Coordination, Sink


class Hub:
    """What a shared store holds for every worker: one sequence and history,
    registrations and capped groups."""

    def __init__(self) -> None:
        self.store = MemoryBackend(history_size=100, history_ttl=60)
        self.backends: list[LoopbackBackend] = []
        self.registered: dict[str, bytes] = {}
        self.groups: dict[str, list[str]] = {}
        self.present: dict[str, dict[tuple[str, str], int]] = {}


class LoopbackBackend(Backend):
    """A shared backend kept in this process: messages reach listening workers later,
    on their own loop, as they would from a server."""

    remote = True

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.listening: set[str] = set()
        self.down = False
        self.failing_listens = 0
        self.before_replay: Callable[[], Awaitable[None]] | None = None
        self.sink: Sink | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.coordination = LoopbackCoordination(self)

    def check(self) -> None:
        if self.down:
            raise ConnectionError("store unreachable")

    async def start(self, sink: Sink) -> None:
        self.sink = sink
        self.loop = asyncio.get_running_loop()
        self.hub.backends.append(self)

    async def close(self) -> None:
        self.hub.backends.remove(self)

    async def listen(self, channels: Collection[str]) -> None:
        if self.failing_listens:
            self.failing_listens -= 1
            raise ConnectionError("subscription connection lost")
        self.listening.update(channels)

    async def unlisten(self, channels: Collection[str]) -> None:
        self.listening.difference_update(channels)

    async def publish(
        self,
        channel: str,
        payload: bytes,
        event_id: str | None,
        *,
        store: bool,
        index: Collection[str] = (),
        history: int | None = None,
    ) -> Message:
        self.check()
        message = self.hub.store.publish_nowait(channel, payload, event_id, store=store, index=index, history=history)
        for backend in list(self.hub.backends):
            if channel in backend.listening and backend.loop is not None and backend.sink is not None:
                backend.loop.call_soon_threadsafe(backend.sink.deliver, message)
        return message

    async def head(self) -> int:
        return await self.hub.store.head()

    async def resolve(self, event_id: str, channels: Collection[str]) -> int | None:
        return await self.hub.store.resolve(event_id, channels)

    async def replay(self, channels: Collection[str], after: int | None) -> Replay:
        hook, self.before_replay = self.before_replay, None
        if hook is not None:
            await hook()
        return await self.hub.store.replay(channels, after)


class LoopbackCoordination(Coordination):
    """The hub's registry of workers and capped groups, as a shared store keeps them."""

    def __init__(self, backend: LoopbackBackend) -> None:
        self.backend = backend
        self.hub = backend.hub

    async def announce(self, worker_id: str, info: bytes, ttl: float) -> bool:
        self.backend.check()
        known = worker_id in self.hub.registered
        self.hub.registered[worker_id] = info
        return known

    async def withdraw(self, worker_id: str) -> None:
        self.hub.registered.pop(worker_id, None)

    async def peers(self) -> dict[str, bytes]:
        self.backend.check()
        return dict(self.hub.registered)

    async def claim(self, group: str, member: str, limit: int, *, evict: bool) -> list[str] | None:
        self.backend.check()
        members = self.hub.groups.setdefault(group, [])
        evicted: list[str] = []
        if len(members) >= limit:
            if not evict:
                return None
            evicted = members[: len(members) - limit + 1]
            del members[: len(evicted)]
        members.append(member)
        return evicted

    async def release(self, group: str, member: str) -> None:
        members = self.hub.groups.get(group, [])
        if member in members:
            members.remove(member)

    async def reclaim(self, groups: dict[str, list[str]]) -> None:
        for group, members in groups.items():
            known = self.hub.groups.setdefault(group, [])
            known.extend(m for m in members if m not in known)

    async def present(self, channel: str, worker_id: str, identity: str, streams: int) -> tuple[int, int]:
        here = self.hub.present.setdefault(channel, {})
        before = sum(n for (_, who), n in here.items() if who == identity)
        if streams:
            here[(worker_id, identity)] = streams
        else:
            here.pop((worker_id, identity), None)
        return before, sum(n for (_, who), n in here.items() if who == identity)

    async def presence(self, channel: str) -> dict[str, int]:
        members: dict[str, int] = {}
        for (_, identity), streams in self.hub.present.get(channel, {}).items():
            members[identity] = members.get(identity, 0) + streams
        return members

    async def absent(self) -> list[tuple[str, str]]:
        return []


def worker_app(hub: Hub, settings: SSESettings, **router_kwargs: Any) -> tuple[FastAPI, SSEService]:
    service = SSEService(settings, backend=LoopbackBackend(hub))
    app = FastAPI()
    router_kwargs.setdefault("authorize", allow_all)
    app.include_router(create_sse_router(service=service, **router_kwargs))
    return app, service


@contextmanager
def workers(count: int, settings: SSESettings | None = None, **router_kwargs: Any) -> Iterator[list[Any]]:
    """``count`` servers sharing one hub; yields [(served, service, backend), ...]."""
    hub = Hub()
    with ExitStack() as stack:
        out = []
        for _ in range(count):
            app, service = worker_app(hub, settings or fast_settings(presence_interval=0.05), **router_kwargs)
            served: Served = stack.enter_context(serve(app))
            out.append((served, service, service.backend))
        yield out


def test_events_cross_workers_and_resume_on_another_worker() -> None:
    with workers(2) as [(a, sse_a, _), (b, sse_b, _)]:
        with open_stream(a.url + "/subscribe", params={"channel": "room"}) as stream:
            sse_b.broadcast("room", "e", 1)  # from the test's thread, through B's outbox
            b.call(sse_b.broadcast_all, "e", 2)
            assert [e.json() for e in stream.events(2)] == [1, 2]
            cursor = stream.last_event_id
        wait_until(lambda: not a.call(sse_a.get_clients))
        b.call(sse_b.publish, "room", "e", 3)
        b.call(sse_b.publish, "elsewhere", "e", -1)
        a.call(sse_a.publish, "room", "e", 4, "own-4")
        with open_stream(
            b.url + "/subscribe", params={"channel": "room"}, headers={"Last-Event-ID": cursor}, opened=False
        ) as resumed:
            got = resumed.events(2)
            sse_a.broadcast("room", "e", 5)
            assert resumed.next_event().json() == 5
        assert [e.json() for e in got] == [3, 4]
        assert got[1].id == "own-4"


def test_outbox_holds_publishes_while_the_backend_is_down(caplog: pytest.LogCaptureFixture) -> None:
    bound = 64 * 1024
    pad = "x" * 1000
    with (
        workers(1, fast_settings(publish_buffer_bytes=bound)) as [(srv, sse, backend)],
        open_stream(srv.url + "/subscribe", params={"channel": "o"}) as stream,
    ):
        backend.down = True
        sse.broadcast("o", "e", [-1, pad])
        wait_until(lambda: sse.counters.backend_errors >= 1, message="the outbox to find the backend down")
        # One burst, from a function on the loop: beyond publish_buffer_bytes publishes
        # are counted as failed, and logged once.
        srv.call(lambda: [sse.broadcast("o", "e", [i, pad]) for i in range(200)])
        kept = wait_until(
            lambda: (s := sse.stats()).pending_publishes + s.publish_failures == 201 and s.pending_publishes,
            message="the burst to be queued or refused",
        )
        assert 40 < kept < 70  # about 1,100 bytes each (payload, channel, bookkeeping)
        wait_until(lambda: any("event(s) lost" in r.getMessage() for r in caplog.records), message="the loss report")
        with pytest.raises(BackendError, match="store unreachable"):
            srv.call(sse.publish, "o", "e", "awaited")
        backend.down = False
        assert [e.json()[0] for e in stream.events(kept)] == list(range(-1, kept - 1))
        assert sse.stats().pending_publishes == 0
        assert sse.stats().publish_failures == 201 - kept + 1  # the awaited one too
        assert sse.counters.backend_errors >= 2
    lost = [r for r in caplog.records if "event(s) lost" in r.getMessage()]
    assert len(lost) == 1 and f"{201 - kept} event(s) lost" in lost[0].getMessage()


def test_publishes_left_in_the_outbox_at_shutdown_are_counted() -> None:
    async def scenario() -> None:
        hub = Hub()
        backend = LoopbackBackend(hub)
        sse = SSEService(fast_settings(), backend=backend)
        await sse.start()
        backend.down = True
        sse.broadcast("c", "e", 1)
        sse.broadcast("c", "e", 2)
        await sse.aclose(grace=0.05)
        assert sse.stats().publish_failures == 2
        assert sse.stats().pending_publishes == 0

    asyncio.run(scenario())


def test_channel_interest_follows_subscriptions_and_survives_a_failed_listen() -> None:
    with workers(1) as [(srv, sse, backend)]:
        backend.failing_listens = 1
        with open_stream(srv.url + "/subscribe", params={"channel": ["i1", "i2"]}) as stream:
            # The stream opened only once the backend delivered its channels.
            assert {"i1", "i2", "$all"} <= backend.listening
            srv.call(sse.broadcast, "i2", "e", "live")
            assert stream.next_event().json() == "live"
        wait_until(lambda: not {"i1", "i2"} & backend.listening, message="the channels to be released")


def test_cluster_stats_add_up_every_live_worker(http: httpx.Client) -> None:
    with workers(2) as [(a, sse_a, _), (b, sse_b, backend_b)]:
        with (
            open_stream(a.url + "/subscribe", params={"channel": "x"}),
            open_stream(a.url + "/subscribe", params={"channel": ["x", "y"]}),
            open_stream(b.url + "/subscribe", params={"channel": "x"}),
        ):
            stats = wait_until(
                lambda: (s := a.call(sse_a.cluster_stats)).total_connections == 3 and s,
                message="both workers' stats",
            )
            assert stats.scope == "cluster"
            assert stats.workers == 2
            assert stats.by_channel == {"x": 3, "y": 1}
            assert stats.connects >= 3
            assert sse_a.stats().total_connections == 2
            backend_b.down = True
            with pytest.raises(BackendError):
                b.call(sse_b.cluster_stats)
            backend_b.down = False
        wait_until(lambda: a.call(sse_a.cluster_stats).total_connections == 0)
    assert sse_a.worker_id != sse_b.worker_id


def identified(**settings: Any) -> Any:
    return workers(
        2,
        fast_settings(presence_interval=0.05, **settings),
        identify=lambda request: request.headers.get("x-user"),
    )


def test_identity_limit_across_workers_closes_the_oldest_anywhere() -> None:
    with identified(max_connections_per_identity=1) as [(a, sse_a, _), (b, sse_b, _)]:
        user = {"x-user": "dora"}
        with open_stream(a.url + "/subscribe", params={"channel": "d"}, headers=user) as first:
            with open_stream(b.url + "/subscribe", params={"channel": "d"}, headers=user) as second:
                assert first.rest() == []  # closed by its own worker, cleanly
                b.call(sse_b.broadcast, "d", "e", "still here")
                assert second.next_event().json() == "still here"
            with open_stream(a.url + "/subscribe", params={"channel": "d"}, headers=user) as third:
                a.call(sse_a.broadcast, "d", "e", "third")
                assert third.next_event().json() == "third"
                # The oldest on the same worker is closed directly.
                with open_stream(a.url + "/subscribe", params={"channel": "d"}, headers=user) as fourth:
                    assert third.rest() == []
                    a.call(sse_a.broadcast, "d", "e", "fourth")
                    assert fourth.next_event().json() == "fourth"
        assert sse_a.stats().disconnects.get("replaced") == 2
        assert "replaced" not in sse_b.stats().disconnects


def test_identity_limit_across_workers_refuses(http: httpx.Client) -> None:
    with identified(max_connections_per_identity=1, identity_limit_policy="refuse") as [(a, _, _), (b, sse_b, bb)]:
        user = {"x-user": "erin"}
        with open_stream(a.url + "/subscribe", params={"channel": "d"}, headers=user):
            response = http.get(b.url + "/subscribe", params={"channel": "d"}, headers=user)
            assert "max_connections_per_identity=1" in soft_refusal(response)
            assert b.call(sse_b.get_clients) == []
            # While the store is unreachable the stream is allowed (and logged).
            bb.down = True
            with open_stream(b.url + "/subscribe", params={"channel": "d"}, headers=user):
                pass
            bb.down = False
        wait_until(lambda: not bb.hub.groups.get("identity:erin"), message="the identity slots to be released")


def test_lost_channels_close_their_clients_so_they_resume() -> None:
    with workers(1) as [(srv, sse, backend)]:
        with (
            open_stream(srv.url + "/subscribe", params={"channel": "lost"}) as hit,
            open_stream(srv.url + "/subscribe", params={"channel": "kept"}) as spared,
        ):
            assert backend.sink is not None
            srv.call(backend.sink.lost, ["lost"])
            assert hit.rest() == []
            srv.call(sse.broadcast, "kept", "e", "alive")
            assert spared.next_event().json() == "alive"
        assert sse.stats().disconnects["backend_gap"] == 1


@pytest.mark.parametrize("delivered", ["before-replay-read", "after-replay-read"])
def test_an_event_both_replayed_and_delivered_live_reaches_the_client_once(delivered: str) -> None:
    with workers(1) as [(srv, sse, backend)]:
        cursor = srv.call(sse.publish, "race", "e", "seen")

        async def publish_during_resume() -> None:
            await backend.publish("race", frame_payload(b"e", '"raced"'), None, store=True)
            if delivered == "before-replay-read":
                # Let the live delivery land in the client's buffer first.
                await asyncio.sleep(0)

        backend.before_replay = publish_during_resume
        with open_stream(
            srv.url + "/subscribe", params={"channel": "race"}, headers={"Last-Event-ID": cursor}, opened=False
        ) as stream:
            assert stream.next_event().json() == "raced"
            srv.call(sse.broadcast, "race", "e", "live")
            assert stream.next_event().json() == "live"
        assert backend.before_replay is None  # the hook ran


def test_a_worker_starts_while_the_store_is_unreachable() -> None:
    async def scenario() -> None:
        backend = LoopbackBackend(Hub())
        backend.down = True
        async with SSEService(fast_settings(), backend=backend) as sse:
            assert sse.counters.backend_errors == 1
            backend.down = False
            client, _ = sse.add_client()
            assert sse.get_clients() == [client]

    asyncio.run(scenario())
