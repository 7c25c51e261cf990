"""Redis goes away and comes back while workers serve streams: clients stay connected,
keep their heartbeats, and receive every event history kept, in order, once."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from helpers.apps import fast_settings
from helpers.redis import RedisServer, start_redis
from helpers.servers import serve_process
from helpers.sinks import Inbox
from helpers.streams import RawResponse, open_stream, raw_stream, wait_until
from test_redis_cluster import APP, cluster_env, local, publish, read_until

from fastapi_sse import BackendError, Message, Publication, SSEService, SSESettings
from fastapi_sse.backends.redis import RedisBackend

DURABLE = ("--appendonly", "yes", "--appendfsync", "always")


@contextmanager
def private_redis(*options: str) -> Iterator[RedisServer]:
    server = start_redis(None, None, *options)
    try:
        yield server
    finally:
        server.proc.kill()
        server.proc.wait(10)


def kill(server: RedisServer) -> None:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)


def restart(server: RedisServer, *options: str) -> None:
    """Start redis-server again on the same port and data directory."""
    server.proc = start_redis(server.port, server.dir, *options).proc


def next_ping(raw: RawResponse) -> None:
    """Read the stream until a heartbeat arrives that was not there before."""
    start = len(raw.body)
    while b": ping" not in raw.body[start:]:
        assert raw.read_chunk(), "the stream ended"


def pubsub_connections(server: RedisServer) -> int:
    with redis.Redis(port=server.port) as r:
        return sum(1 for c in r.client_list() if c.get("flags") == "P" or c.get("sub", "0") != "0")


def test_redis_restart_loses_nothing_history_kept(tmp_path: Any) -> None:
    with private_redis(*DURABLE) as server:
        env = cluster_env(server, f"test:{uuid.uuid4().hex[:10]}:", heartbeat_interval=0.3)
        with serve_process(APP, env) as (one, _), serve_process(APP, env) as (two, _), ExitStack() as stack:
            x = stack.enter_context(open_stream(one + "/subscribe", params={"channel": "r"}))
            y = stack.enter_context(open_stream(two + "/subscribe", params={"channel": "r"}))
            raw = stack.enter_context(raw_stream(int(two.rsplit(":", 1)[1]), "/subscribe?channel=quiet"))
            before = publish(two, "before", channel="r")["id"]
            assert read_until(x, '"before"') == read_until(y, '"before"') == [(before, '"before"')]
            assert pubsub_connections(server) == 2

            kill(server)
            # An awaited publish says so; fire-and-forget ones wait in the outbox.
            failed = publish(two, "lost", channel="r")
            assert "could not publish" in failed["error"]
            for i in range(3):
                assert publish(one, f"down-{i}", channel="r", wait=False) == {"sent": True}
            assert local(one)["pending_publishes"] == 3
            next_ping(raw)  # streams keep their heartbeats while Redis is away
            # A new stream cannot start: it gets the retry hint and ends, so the
            # browser comes back after the retry delay (a 5xx would stop it for good).
            with open_stream(one + "/subscribe", params={"channel": "r"}, opened=False) as refused:
                assert refused.rest() == [] and refused.retry == 200
            assert local(one)["disconnects"] == {"backend_unavailable": 1}

            restart(server, *DURABLE)
            wait_until(lambda: local(one)["pending_publishes"] == 0, timeout=10, message="the outbox to drain")
            wait_until(lambda: local(two)["reconnects"] >= 1, timeout=10, message="worker two to reconnect")
            after = publish(two, "after", channel="r")["id"]
            expected = ['"down-0"', '"down-1"', '"down-2"', '"after"']
            for stream in (x, y):
                got = read_until(stream, '"after"')
                assert [d for _, d in got] == expected
                ids = [int(i) for i, _ in got]
                assert ids == sorted(set(ids)) and int(before) < ids[0] and ids[-1] == int(after)
            # Each worker holds one subscription connection again, and no stale one.
            wait_until(lambda: pubsub_connections(server) == 2, message="one subscription per worker")
            assert local(one)["clients"] and local(two)["clients"]


def test_redis_that_lost_its_data_makes_clients_resume_with_a_gap() -> None:
    with private_redis() as server:
        env = cluster_env(server, f"test:{uuid.uuid4().hex[:10]}:")
        with serve_process(APP, env) as (one, _):
            with open_stream(one + "/subscribe", params={"channel": "r"}) as stream:
                before = publish(one, "before", channel="r")["id"]
                assert read_until(stream, '"before"') == [(before, '"before"')]
                kill(server)
                restart(server)
                # History is gone: the worker cannot know what it missed, so it closes
                # the stream instead of pretending nothing happened.
                assert stream.rest() == []
            assert local(one)["disconnects"] == {"backend_gap": 1}
            with open_stream(
                one + "/subscribe", params={"channel": "r"}, headers={"Last-Event-ID": before}, opened=False
            ) as resumed:
                gap = resumed.next_event()
                assert gap.event == "gap"
                assert json.loads(gap.data) == {"channels": ["r"], "all": True, "last_event_id": before}
                live = publish(one, "live", channel="r")["id"]
                assert int(live) > int(before)
                assert read_until(resumed, '"live"') == [(live, '"live"')]


@pytest.mark.anyio
async def test_start_fails_with_what_to_fix(redis_server: RedisServer) -> None:
    from helpers.servers import free_port

    async def start_error(url: str) -> str:
        sse = SSEService(SSESettings(backend="redis", redis_url=url, redis_timeout=2))
        with pytest.raises(BackendError) as info:
            await sse.start()
        return str(info.value)

    message = await start_error(f"redis://127.0.0.1:{free_port()}/0")
    assert "cannot reach Redis at redis://127.0.0.1:" in message and "check SSE_REDIS_URL" in message
    with private_redis("--requirepass", "s3cret") as locked:
        message = await start_error(f"redis://:wrong@127.0.0.1:{locked.port}/0")
        assert "fix the user/password in SSE_REDIS_URL" in message and "s3cret" not in message
        assert "wrong" not in message
        message = await start_error(f"redis://127.0.0.1:{locked.port}/0")
        assert "SSE_REDIS_URL" in message and "password" in message
    with private_redis("--rename-command", "EVAL", "") as no_scripts:
        message = await start_error(no_scripts.url)
        assert "EVAL" in message


class Cuttable:
    """A TCP proxy to Redis that a test can cut (every connection drops, new ones are
    refused) and heal: the network between a worker and Redis, under test control."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.open = True
        self._pipes: set[asyncio.StreamWriter] = set()
        self._silenced: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._lose_reply = False
        self._cut_after_lost_reply = False
        self.replies_lost = 0
        self.port = 0

    async def __aenter__(self) -> Cuttable:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cut(self) -> None:
        self.open = False
        for writer in list(self._pipes):
            writer.transport.abort()
        self._pipes.clear()

    def heal(self) -> None:
        self.open = True

    def black_hole(self) -> None:
        """Silently drop everything on the current connections, without closing them
        (a peer that vanished without a FIN); new connections work."""
        self._silenced |= self._pipes

    def lose_next_reply(self, *, then_cut: bool = False) -> None:
        """Let the next script call reach Redis, then drop its reply and the connection:
        Redis ran it, and the caller cannot know. With ``then_cut``, cut the network
        too, so that redis-py's own retry of the call fails as well."""
        self._lose_reply = True
        self._cut_after_lost_reply = then_cut

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._pipes |= {writer, up_writer}
        armed = [False]
        await asyncio.gather(
            self._pump(reader, up_writer, armed, request=True),
            self._pump(up_reader, writer, armed, request=False),
            return_exceptions=True,
        )

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, armed: list[bool], *, request: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if request and self._lose_reply and b"EVAL" in data:
                    self._lose_reply = False
                    armed[0] = True
                elif not request and armed[0]:
                    self.replies_lost += 1
                    if self._cut_after_lost_reply:
                        self.cut()
                    return
                if writer not in self._silenced:
                    writer.write(data)
                    await writer.drain()
        finally:
            self._pipes.discard(writer)
            writer.transport.abort()


@dataclass
class Partition:
    """A worker backend reaching Redis through a connection the test can cut, and a
    publisher reaching it directly; ``lost`` records what the worker reports lost."""

    network: Cuttable
    worker: RedisBackend
    publisher: RedisBackend
    inbox: Inbox
    lost: list[list[str]]


@asynccontextmanager
async def partition(redis_server: RedisServer, *, history_size: int) -> AsyncIterator[Partition]:
    prefix = f"test:{uuid.uuid4().hex[:10]}:"
    settings: Any = {"key_prefix": prefix, "history_size": history_size, "timeout": 1.0, "max_backoff": 0.1}
    async with Cuttable(redis_server.port) as network:
        worker = RedisBackend(network.url, **settings)
        publisher = RedisBackend(redis_server.url, **settings)
        inbox = Inbox()
        state = Partition(network, worker, publisher, inbox, inbox.lost_channels)
        await worker.start(state.inbox)
        await publisher.start(Inbox())
        try:
            yield state
        finally:
            await worker.close()
            await publisher.close()


@pytest.mark.anyio
@pytest.mark.parametrize("trimmed", [False, True])
async def test_after_a_partition_the_worker_catches_up_from_history_or_reports_the_gap(
    redis_server: RedisServer, trimmed: bool
) -> None:
    async with partition(redis_server, history_size=2) as cut:
        network, worker, publisher, inbox, lost = cut.network, cut.worker, cut.publisher, cut.inbox, cut.lost
        await worker.listen(["r", "s"])
        first = await publisher.publish("r", b"1", None, store=True)
        await inbox.wait_for(1)
        network.cut()
        during = [("r", b"2"), ("x", b"-"), ("s", b"3"), ("r", b"4")] + ([("r", b"5")] if trimmed else [])
        missed = {p: await publisher.publish(ch, p, None, store=True) for ch, p in during}
        network.heal()
        last = await publisher.publish("s", b"6", None, store=True)
        if trimmed:
            # History of "r" kept only 4 and 5: 2 is lost, so "r" is reported, not replayed.
            expected = [first, missed[b"3"], last]
            assert [m.seq for m in await inbox.wait_for(3)] == [m.seq for m in expected]
            assert lost == [["r"]]
        else:
            expected = [first, missed[b"2"], missed[b"3"], missed[b"4"], last]
            assert [m.seq for m in await inbox.wait_for(5)] == [m.seq for m in expected]
            assert lost == []
        assert worker.reconnects == 1
        assert [m.payload for m in inbox.messages] == [m.payload for m in expected]


@pytest.mark.anyio
async def test_after_a_partition_the_worker_catches_up_on_events_for_its_clients(redis_server: RedisServer) -> None:
    # Regression: send_to events published while a worker was cut off were lost
    # silently, since per-client events are kept out of history.
    client_channel = "$client:" + "a" * 12 + "." + "b" * 32
    async with partition(redis_server, history_size=3) as cut:
        network, worker, publisher, inbox, lost = cut.network, cut.worker, cut.publisher, cut.inbox, cut.lost
        await worker.listen(["r", client_channel])
        first = await publisher.publish(client_channel, b"1", None, store=False)
        await inbox.wait_for(1)
        network.cut()
        during = [
            await publisher.publish(client_channel, str(i).encode(), "msg-" + str(i), store=False) for i in (2, 3)
        ]
        network.heal()
        last = await publisher.publish("r", b"4", None, store=True)
        expected = [first, *during, last]
        assert [m.seq for m in await inbox.wait_for(4)] == [m.seq for m in expected]
        assert [m.id for m in inbox.messages[1:3]] == ["msg-2", "msg-3"]
        assert lost == []
        # More than the backlog holds: the worker cannot know what it lost, so it
        # reports its clients' channels instead of staying silent.
        network.cut()
        for _ in range(5):
            await publisher.publish(client_channel, b"x", None, store=False)
        network.heal()
        await publisher.publish("r", b"5", None, store=True)
        await inbox.wait_for(8)
        assert lost == [[client_channel]]


@pytest.mark.anyio
async def test_a_silent_connection_is_detected_by_ping_and_replaced(redis_server: RedisServer) -> None:
    prefix = f"test:{uuid.uuid4().hex[:10]}:"
    async with Cuttable(redis_server.port) as network:
        worker = RedisBackend(network.url, key_prefix=prefix, timeout=1.0, max_backoff=0.1, health_interval=0.2)
        publisher = RedisBackend(redis_server.url, key_prefix=prefix)
        inbox = Inbox()
        await worker.start(inbox)
        await publisher.start(Inbox())
        try:
            await worker.listen(["r"])
            network.black_hole()
            sent = [await publisher.publish("r", str(i).encode(), None, store=True) for i in range(3)]
            got = await inbox.wait_for(3)
            assert [m.seq for m in got] == [m.seq for m in sent]
            assert worker.reconnects == 1
        finally:
            await worker.close()
            await publisher.close()


@pytest.mark.anyio
async def test_a_publish_whose_reply_is_lost_is_stored_once(redis_server: RedisServer) -> None:
    # redis-py sends the call again on a fresh connection; the event must not be doubled.
    async with Cuttable(redis_server.port) as network:
        backend = RedisBackend(network.url, key_prefix=f"test:{uuid.uuid4().hex[:10]}:", timeout=1.0, max_backoff=0.1)
        inbox = Inbox()
        await backend.start(inbox)
        try:
            first = await backend.publish("news", b"one", None, store=True)
            network.lose_next_reply()
            second = await backend.publish("news", b"two", None, store=True)
            assert network.replies_lost == 1
            assert second.seq == first.seq + 1
            assert await backend.head() == second.seq
            replay = await backend.replay(["news"], first.seq - 1)
            assert [(m.seq, m.payload) for m in replay.messages] == [(first.seq, b"one"), (second.seq, b"two")]
            # A batch too: a pipeline of script calls (600 events: two calls) sent again.
            network.lose_next_reply()
            batch = [Publication("news", str(i).encode(), None, True) for i in range(600)]
            sent = await backend.publish_many(batch)
            assert network.replies_lost == 2
            assert [m.seq for m in sent] == list(range(second.seq + 1, second.seq + 601))
            assert await backend.head() == sent[-1].seq
            replay = await backend.replay(["news"], second.seq)
            assert [m.payload for m in replay.messages] == [p.payload for p in batch]
        finally:
            await backend.close()


def event_data(message: Message) -> Any:
    """The JSON data of an event the service published (its payload's ``data:`` line)."""
    return json.loads(message.payload.decode().split("data: ", 1)[1])


async def until(condition: Callable[[], Any], within: float = 10.0) -> None:
    """Wait for ``condition()`` to hold, checking once per loop turn (a readiness probe)."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.005)


@asynccontextmanager
async def service_through(network: Cuttable, prefix: str, **settings: Any) -> AsyncIterator[SSEService]:
    values: dict[str, Any] = {
        "backend": "redis",
        "redis_url": network.url,
        "redis_key_prefix": prefix,
        "redis_timeout": 1.0,
        "redis_max_backoff": 0.1,
    }
    async with SSEService(fast_settings(**values, **settings)) as sse:
        yield sse


@asynccontextmanager
async def watching(redis_server: RedisServer, prefix: str, channel: str) -> AsyncIterator[tuple[RedisBackend, Inbox]]:
    """A backend connected straight to Redis, listening to ``channel``: what was stored
    and announced, whatever happens to the service's own connections."""
    watcher = RedisBackend(redis_server.url, key_prefix=prefix)
    inbox = Inbox()
    await watcher.start(inbox)
    try:
        await watcher.listen([channel])
        yield watcher, inbox
    finally:
        await watcher.close()


@pytest.mark.anyio
async def test_an_outbox_batch_sent_again_after_a_failure_is_stored_once(redis_server: RedisServer) -> None:
    # The script ran, its reply was lost, redis-py's retry failed too: the outbox
    # sends the batch again once Redis answers, and Redis recognises it.
    prefix = f"test:{uuid.uuid4().hex[:10]}:"
    async with (
        Cuttable(redis_server.port) as network,
        watching(redis_server, prefix, "r") as (watcher, inbox),
        service_through(network, prefix) as sse,
    ):
        network.lose_next_reply(then_cut=True)
        for i in range(3):
            sse.broadcast("r", "e", i)
        await until(lambda: network.replies_lost == 1 and sse.counters.backend_errors >= 1)
        assert sse.stats().pending_publishes == 3
        network.heal()
        await until(lambda: sse.stats().pending_publishes == 0)
        sse.broadcast("r", "e", "after")
        await until(lambda: inbox.messages and event_data(inbox.messages[-1]) == "after")
        assert [event_data(m) for m in inbox.messages] == [0, 1, 2, "after"]
        seqs = [m.seq for m in inbox.messages]
        replay = await watcher.replay(["r"], seqs[0] - 1)
        assert [m.seq for m in replay.messages] == seqs and seqs[:3] == list(range(seqs[0], seqs[0] + 3))
        assert sse.stats().publish_failures == 0


@pytest.mark.anyio
async def test_a_burst_while_redis_is_unreachable_fills_the_outbox_to_its_bound(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = f"test:{uuid.uuid4().hex[:10]}:"
    pad = "x" * 1000
    async with (
        Cuttable(redis_server.port) as network,
        watching(redis_server, prefix, "o") as (_, inbox),
        service_through(network, prefix, publish_buffer_bytes=64 * 1024) as sse,
    ):
        network.cut()
        sse.broadcast("o", "e", [-1, pad])
        await until(lambda: sse.counters.backend_errors >= 1)
        # One burst from this task, on the loop, while Redis is known to be unreachable.
        for i in range(200):
            sse.broadcast("o", "e", [i, pad])
        stats = sse.stats()
        kept, lost = stats.pending_publishes, stats.publish_failures
        assert kept + lost == 201 and 40 < kept < 70  # about 1,100 bytes each in 64 KiB
        await until(lambda: any("event(s) lost" in r.getMessage() for r in caplog.records))
        network.heal()
        await inbox.wait_for(kept, within=10)
        await until(lambda: sse.stats().pending_publishes == 0)
        # What fitted arrives in order; exactly what was counted lost is missing.
        assert [event_data(m)[0] for m in inbox.messages] == list(range(-1, kept - 1))
        assert sse.stats().publish_failures == lost
    reports = [r for r in caplog.records if "event(s) lost" in r.getMessage()]
    assert len(reports) == 1, [r.getMessage() for r in reports]
    assert reports[0].getMessage().startswith(f"{lost} event(s) lost: the backend is unreachable")
