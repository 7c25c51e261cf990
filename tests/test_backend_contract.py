"""One contract, every backend: MemoryBackend in process, RedisBackend on a real redis-server.

Each Redis test uses its own key prefix, so tests share one server without FLUSHALL.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from helpers.redis import RedisServer
from helpers.sinks import Inbox

from fastapi_sse.backends.base import Backend, Publication
from fastapi_sse.backends.memory import MemoryBackend
from fastapi_sse.backends.redis import RedisBackend

pytestmark = pytest.mark.anyio

Factory = Callable[..., Backend]


@pytest.fixture(params=["memory", "redis"])
def make_backend(request: pytest.FixtureRequest) -> Factory:
    """Builds a backend of the parametrised kind with the given history settings."""
    if request.param == "memory":
        return lambda **kw: MemoryBackend(**kw)
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"test:{uuid.uuid4().hex[:10]}:"
    return lambda **kw: RedisBackend(server.url, key_prefix=prefix, timeout=2.0, **kw)


@pytest.fixture
async def started(make_backend: Factory) -> AsyncIterator[Callable[..., Any]]:
    backends: list[Backend] = []

    async def start(**kw: Any) -> tuple[Backend, Inbox]:
        backend = make_backend(**kw)
        inbox = Inbox()
        await backend.start(inbox)
        backends.append(backend)
        return backend, inbox

    yield start
    for backend in backends:
        await backend.close()


async def until(condition: Callable[[], Any], within: float = 5.0) -> Any:
    """Await ``condition()`` (a coroutine function) until it is truthy (it polls the store)."""
    async with asyncio.timeout(within):
        while True:
            if value := await condition():
                return value
            await asyncio.sleep(0.01)


async def test_sequence_increases_across_channels_and_ids_default_to_it(started: Any) -> None:
    backend, _ = await started()
    start = await backend.head()
    a = await backend.publish("a", b"1", None, store=True)
    b = await backend.publish("b", b"2", "msg-7", store=True)
    c = await backend.publish("a", b"3", None, store=False)
    assert [a.seq, b.seq, c.seq] == [start + 1, start + 2, start + 3]
    assert (a.id, b.id, c.id) == (str(a.seq), "msg-7", str(c.seq))
    assert (a.channel, a.payload) == ("a", b"1")
    assert await backend.head() == c.seq


async def test_listened_channels_are_delivered_in_order(started: Any) -> None:
    backend, inbox = await started()
    await backend.listen(["a", "b"])
    sent = [await backend.publish(ch, f"{i}\n\x00é".encode(), None, store=i % 2 == 0) for i, ch in enumerate("abab")]
    got = await inbox.wait_for(4)
    assert [(m.seq, m.channel, m.id, m.payload) for m in got] == [(m.seq, m.channel, m.id, m.payload) for m in sent]


async def test_replay_merges_channels_by_sequence_after_the_cursor(started: Any) -> None:
    backend, _ = await started()
    first = await backend.publish("a", b"0", None, store=True)
    await backend.publish("b", b"1", "msg-1", store=True)
    await backend.publish("c", b"other", None, store=True)
    await backend.publish("a", b"2", None, store=True)
    await backend.publish("a", b"not stored", None, store=False)
    replay = await backend.replay(["a", "b"], first.seq)
    assert [(m.channel, m.payload, m.id) for m in replay.messages] == [
        ("b", b"1", "msg-1"),
        ("a", b"2", str(first.seq + 3)),
    ]
    assert replay.head == first.seq + 4
    assert replay.gaps == frozenset()
    assert not (await backend.replay(["a"], replay.head)).messages


async def test_unknown_cursor_makes_every_channel_a_gap(started: Any) -> None:
    backend, _ = await started()
    await backend.publish("a", b"0", None, store=True)
    replay = await backend.replay(["a", "b"], None)
    assert replay.gaps == {"a", "b"} and not replay.messages


async def test_resolve_caller_ids_and_sequence_numbers(started: Any) -> None:
    backend, _ = await started()
    m = await backend.publish("a", b"0", "msg-123", store=True)
    assert await backend.resolve("msg-123", ["a"]) == m.seq
    assert await backend.resolve(str(m.seq), ["a"]) == m.seq
    # A sequence number is a cursor across channels, known to every client.
    assert await backend.resolve(str(m.seq), ["other"]) == m.seq
    assert await backend.resolve(str(m.seq + 1000), ["a"]) is None
    assert await backend.resolve("never-published", ["a"]) is None


async def test_trimmed_history_is_a_gap_for_that_channel_only(started: Any) -> None:
    backend, _ = await started(history_size=2)
    cursor = await backend.publish("a", b"0", None, store=True)
    for i in range(3):
        await backend.publish("a", str(i).encode(), None, store=True)
    kept = await backend.publish("b", b"b", None, store=True)
    replay = await backend.replay(["a", "b"], cursor.seq)
    assert replay.gaps == {"a"}
    assert [m.seq for m in replay.messages] == [kept.seq]
    # A cursor inside what is kept resumes exactly.
    inside = await backend.replay(["a"], cursor.seq + 2)
    assert inside.gaps == frozenset() and [m.payload for m in inside.messages] == [b"2"]


async def test_expired_history_is_a_gap_for_that_channel_only(started: Any) -> None:
    backend, _ = await started(history_ttl=0.3)
    cursor = await backend.publish("kept", b"before", None, store=True)
    await backend.publish("a", b"old", None, store=True)

    async def expired() -> bool:
        return "a" in (await backend.replay(["a"], cursor.seq)).gaps

    await until(expired)
    fresh = await backend.publish("kept", b"fresh", None, store=True)
    replay = await backend.replay(["a", "kept", "gone"], cursor.seq)
    # "gone" has no history at all: a cursor this old may have missed events on it.
    assert replay.gaps == {"a", "gone"}
    assert [m.seq for m in replay.messages] == [fresh.seq]
    later = await backend.replay(["a", "kept", "gone"], fresh.seq - 1)
    assert later.gaps == frozenset() and [m.payload for m in later.messages] == [b"fresh"]


async def test_channel_starting_afresh_still_reports_what_expired(started: Any) -> None:
    # Regression: a channel whose whole history expired and that was used again
    # lost its trim mark, so a resume from before the expiry saw no gap.
    backend, _ = await started(history_ttl=0.3)
    cursor = await backend.publish("a", b"0", None, store=True)
    await backend.publish("a", b"1", None, store=True)

    async def expired() -> bool:
        return "a" in (await backend.replay(["a"], cursor.seq)).gaps

    await until(expired)
    again = await backend.publish("a", b"2", None, store=True)
    assert (await backend.replay(["a"], cursor.seq)).gaps == {"a"}
    assert [m.seq for m in (await backend.replay(["a"], cursor.seq + 1)).messages] == [again.seq]


async def test_redis_forgets_caller_ids_with_their_history(redis_server: RedisServer) -> None:
    backend = RedisBackend(redis_server.url, key_prefix=f"test:{uuid.uuid4().hex[:10]}:", history_ttl=0.3)
    await backend.start(Inbox())
    await backend.publish("a", b"0", "msg-old", store=True)

    async def forgotten() -> bool:
        await backend.publish("a", b"tick", None, store=True)
        return await backend.resolve("msg-old", ["a"]) is None

    try:
        await until(forgotten)
    finally:
        await backend.close()


async def test_redis_remembers_a_bounded_number_of_caller_ids(redis_server: RedisServer) -> None:
    backend = RedisBackend(redis_server.url, key_prefix=f"test:{uuid.uuid4().hex[:10]}:", id_index_size=3)
    await backend.start(Inbox())
    try:
        for i in range(5):
            await backend.publish("a", b"x", f"msg-{i}", store=True)
        assert [await backend.resolve(f"msg-{i}", ["a"]) is not None for i in range(5)] == [
            False,
            False,
            True,
            True,
            True,
        ]
    finally:
        await backend.close()


async def test_redis_delivers_only_listened_channels_and_stops_after_unlisten(redis_server: RedisServer) -> None:
    prefix = f"test:{uuid.uuid4().hex[:10]}:"
    backend = RedisBackend(redis_server.url, key_prefix=prefix)
    inbox = Inbox()
    await backend.start(inbox)
    try:
        await backend.listen(["a"])
        await backend.publish("b", b"not mine", None, store=True)
        await backend.publish("a", b"mine", None, store=True)
        assert [m.payload for m in await inbox.wait_for(1)] == [b"mine"]
        await backend.unlisten(["a"])
        await backend.listen(["c"])
        await backend.publish("a", b"gone", None, store=True)
        await backend.publish("c", b"marker", None, store=True)
        assert [m.payload for m in await inbox.wait_for(2)] == [b"mine", b"marker"]
    finally:
        await backend.close()


async def test_redis_routes_client_channels_through_one_worker_channel(redis_server: RedisServer) -> None:
    prefix = f"test:{uuid.uuid4().hex[:10]}:"
    backend = RedisBackend(redis_server.url, key_prefix=prefix)
    inbox = Inbox()
    await backend.start(inbox)
    try:
        await backend.listen(["$client:w1.aaa", "$client:w1.bbb"])
        await backend.publish("$client:w1.bbb", b"to b", None, store=False)
        await backend.publish("$client:w2.ccc", b"other worker", None, store=False)
        await backend.publish("$client:w1.aaa", b"to a", None, store=False)
        got = await inbox.wait_for(2)
        assert [(m.channel, m.payload) for m in got] == [("$client:w1.bbb", b"to b"), ("$client:w1.aaa", b"to a")]
        # One Redis subscription carries both clients' channels (beside the system channel).
        async with aioredis.Redis.from_url(redis_server.url) as r:
            assert sorted(await r.pubsub_channels(prefix + "*")) == sorted(
                [prefix.encode() + b"sys", prefix.encode() + b"w:w1"]
            )
    finally:
        await backend.close()


async def test_a_backend_can_start_again_after_close(make_backend: Factory) -> None:
    backend = make_backend()
    for attempt in range(2):
        inbox = Inbox()
        await backend.start(inbox)
        try:
            await backend.listen(["again"])
            sent = await backend.publish("again", str(attempt).encode(), None, store=True)
            assert [m.seq for m in await inbox.wait_for(1)] == [sent.seq]
        finally:
            await backend.close()


async def test_ids_of_events_kept_out_of_history_resolve(started: Any) -> None:
    # Regression: a send_to event with the caller's id was not indexed, so a client
    # resuming from it got a gap on every channel although nothing was lost.
    backend, _ = await started()
    direct = await backend.publish("$client:w.1", b"p", "msg-direct", store=False, index=["a", "$identity:u"])
    later = await backend.publish("a", b"later", None, store=True)
    assert await backend.resolve("msg-direct", ["a", "$all"]) == direct.seq
    assert await backend.resolve("msg-direct", ["$identity:u"]) == direct.seq
    # Indexed under two of the reader's channels, it is still one event.
    assert await backend.resolve("msg-direct", ["a", "$identity:u", "$all"]) == direct.seq
    assert await backend.resolve("msg-direct", ["b", "$all", "$identity:v"]) is None
    assert await backend.resolve("msg-direct", ["$client:w.1"]) is None
    replay = await backend.replay(["a"], direct.seq)
    assert replay.gaps == frozenset() and [m.seq for m in replay.messages] == [later.seq]


async def test_an_id_repeated_on_a_channel_resolves_to_nothing(started: Any) -> None:
    # Resuming from either of two events with one id would skip or repeat events:
    # the id is unknown (the service answers with the gap event).
    backend, _ = await started()
    await backend.publish("a", b"1", "msg-twice", store=True)
    await backend.publish("a", b"2", None, store=True)
    await backend.publish("a", b"3", "msg-twice", store=True)
    assert await backend.resolve("msg-twice", ["a", "$all"]) is None
    once = await backend.publish("b", b"4", "msg-twice", store=True)
    # On a channel where it came once it still resolves, for a client reading only that one.
    assert await backend.resolve("msg-twice", ["b"]) == once.seq


async def test_an_id_on_two_of_the_clients_channels_resolves_to_nothing(started: Any) -> None:
    backend, _ = await started()
    on_a = await backend.publish("a", b"1", "msg-both", store=True)
    on_b = await backend.publish("b", b"2", "msg-both", store=True)
    assert await backend.resolve("msg-both", ["a", "b"]) is None
    assert await backend.resolve("msg-both", ["a"]) == on_a.seq
    assert await backend.resolve("msg-both", ["b", "c"]) == on_b.seq


async def test_an_id_on_a_channel_the_client_does_not_read_is_unknown_to_it(started: Any) -> None:
    backend, _ = await started()
    await backend.publish("secret", b"1", "msg-secret", store=True)
    await backend.publish("$client:w.2", b"2", "msg-private", store=False, index=["secret", "$identity:alice"])
    for event_id in ("msg-secret", "msg-private", "msg-never"):
        assert await backend.resolve(event_id, ["public", "$all", "$identity:bob"]) is None
    assert await backend.resolve("msg-secret", []) is None


async def test_an_id_used_again_after_its_event_left_history_stays_unknown(started: Any) -> None:
    # The index outlives a trimmed event: a client holding the old id must not
    # resume from the new event and skip what came between.
    backend, _ = await started(history_size=1)
    await backend.publish("a", b"old", "msg-reused", store=True)
    await backend.publish("a", b"between", None, store=True)
    await backend.publish("a", b"new", "msg-reused", store=True)
    assert await backend.resolve("msg-reused", ["a"]) is None


async def test_publish_many_numbers_stores_and_delivers_a_batch_in_order(started: Any) -> None:
    backend, inbox = await started()
    await backend.listen(["a", "b", "$client:w1.c"])
    before = await backend.head()
    batch = [
        Publication("a", b"0", None, True),
        Publication("b", b"1", "msg-1", True),
        Publication("$client:w1.c", b"2", "msg-2", False, ("a",)),
        Publication("a", b"3", None, True),
    ]
    sent = await backend.publish_many(batch)
    assert [m.seq for m in sent] == [before + 1, before + 2, before + 3, before + 4]
    assert [(m.channel, m.id, m.payload) for m in sent] == [
        ("a", str(before + 1), b"0"),
        ("b", "msg-1", b"1"),
        ("$client:w1.c", "msg-2", b"2"),
        ("a", str(before + 4), b"3"),
    ]
    got = await inbox.wait_for(4)
    assert [(m.seq, m.channel, m.id, m.payload) for m in got] == [(m.seq, m.channel, m.id, m.payload) for m in sent]
    replay = await backend.replay(["a", "b"], before)
    assert [m.payload for m in replay.messages] == [b"0", b"1", b"3"]
    assert await backend.resolve("msg-2", ["a"]) == before + 3
    assert await backend.publish_many([]) == []
