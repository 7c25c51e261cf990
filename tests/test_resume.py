"""Resume with Last-Event-ID: exact replay across channels, or a ``gap`` event that says what was lost."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import Request
from helpers.apps import fast_settings, router_app, seed_app, served
from helpers.streams import Stream, open_stream, parse, raw_stream, wait_until

from fastapi_sse import GAP_EVENT


@pytest.fixture(scope="module")
def server() -> Any:
    with served(router_app()) as pair:
        yield pair


def published(events: list[Any]) -> list[tuple[str, Any]]:
    return [(e.event, e.json()) for e in events]


def resume_kwargs(how: str, cursor: str) -> dict[str, Any]:
    if how == "header":
        return {"headers": {"Last-Event-ID": cursor}}
    return {"params": {"last_event_id": cursor}}


@pytest.mark.parametrize("how", ["header", "query"])
def test_reconnect_replays_exactly_the_missed_events_then_live(server: Any, how: str) -> None:
    srv, sse = server
    channels = [f"{how}-a", f"{how}-b"]
    a, b = channels
    with open_stream(srv.url + "/subscribe", params={"channel": channels}) as first:
        srv.call(sse.broadcast, a, "seen", 1)
        srv.call(sse.broadcast, b, "seen", 2)
        assert published(first.events(2)) == [("seen", 1), ("seen", 2)]
        cursor = first.last_event_id
    wait_until(lambda: not srv.call(sse.get_clients_by_channel, a), message="the first stream to close")

    srv.call(sse.broadcast, b, "missed", 3)
    srv.call(sse.broadcast, f"{how}-elsewhere", "not-mine", 0)
    srv.call(sse.broadcast, a, "missed", 4, f"{how}-own-5")
    srv.call(sse.broadcast_all, "missed", 5)
    srv.call(sse.broadcast, a, "missed", 6)

    kwargs = resume_kwargs(how, cursor)
    params = {"channel": channels, **kwargs.pop("params", {})}
    with open_stream(srv.url + "/subscribe", params=params, opened=False, **kwargs) as second:
        replayed = second.events(4)
        srv.call(sse.broadcast, a, "live", 7)
        live = second.next_event()
    assert published(replayed) == [("missed", 3), ("missed", 4), ("missed", 5), ("missed", 6)]
    assert replayed[1].id == f"{how}-own-5"
    assert published([live]) == [("live", 7)]
    assert second.retry == 500


def test_header_wins_over_query(server: Any) -> None:
    srv, sse = server
    srv.call(sse.broadcast, "hq", "e", 1, "hq-1")
    srv.call(sse.broadcast, "hq", "e", 2, "hq-2")
    with open_stream(
        srv.url + "/subscribe",
        params={"channel": "hq", "last_event_id": "hq-1"},
        headers={"Last-Event-ID": "hq-2"},
        opened=False,
    ) as stream:
        srv.call(sse.broadcast, "hq", "e", 3)
        assert stream.next_event().json() == 3


def test_seed_pattern_resume_with_subscribe_after_add_client() -> None:
    with served(seed_app()) as (srv, sse):
        with open_stream(srv.url + "/events", params={"user": "7"}) as first:
            srv.call(sse.broadcast, "user:7", "notification", {"n": 1}, "msg-123")
            assert first.next_event().id == "msg-123"
        srv.call(sse.broadcast, "user:7", "notification", {"n": 2})
        srv.call(sse.broadcast, "user:8", "notification", {"n": -1})
        srv.call(sse.broadcast, "user:7", "notification", {"n": 3}, "msg-125")
        with open_stream(
            srv.url + "/events", params={"user": "7"}, headers={"Last-Event-ID": "msg-123"}, opened=False
        ) as second:
            got = second.events(2)
        assert [e.json() for e in got] == [{"n": 2}, {"n": 3}]
        assert got[1].id == "msg-125"
        with open_stream(srv.url + "/events", params={"user": "7", "last_event_id": got[0].id}, opened=False) as third:
            assert third.next_event().json() == {"n": 3}


def test_resume_from_service_id_and_caller_id(server: Any) -> None:
    srv, sse = server
    service_id = srv.call(sse.publish, "ids", "e", "first")
    srv.call(sse.publish, "ids", "e", "second", "msg-200")
    srv.call(sse.publish, "ids", "e", "third")
    for cursor, expected in ((service_id, ["second", "third"]), ("msg-200", ["third"])):
        with open_stream(
            srv.url + "/subscribe", params={"channel": "ids"}, headers={"Last-Event-ID": cursor}, opened=False
        ) as stream:
            assert [e.json() for e in stream.events(len(expected))] == expected
            srv.call(sse.broadcast, "ids", "marker", None)
            assert stream.next_event().event == "marker"


def test_resume_with_nothing_missed_moves_cursor_to_head(server: Any) -> None:
    srv, sse = server
    cursor = srv.call(sse.publish, "quiet", "e", 1)
    srv.call(sse.broadcast, "busy", "e", 2)
    head = srv.call(sse.backend.head)
    with open_stream(srv.url + "/subscribe", params={"channel": "quiet"}, headers={"Last-Event-ID": cursor}) as stream:
        assert stream.last_event_id == str(head)
        assert all(f.data == "" for f in stream.frames)


def read_gap(stream: Stream) -> Any:
    events = stream.until_event(GAP_EVENT)
    return events


@pytest.mark.parametrize("cursor", ["never-seen-id", "999999999"])
def test_unknown_id_gets_gap_event_with_resumable_id(server: Any, cursor: str) -> None:
    srv, sse = server
    gaps_before = sse.stats().resume_gaps
    with open_stream(
        srv.url + "/subscribe",
        params={"channel": ["gap-b", "gap-a"]},
        headers={"Last-Event-ID": cursor},
        opened=False,
    ) as stream:
        gap = stream.next_event()
    assert gap.event == GAP_EVENT
    assert gap.json() == {"channels": ["gap-a", "gap-b"], "all": True, "last_event_id": cursor}
    assert gap.id == str(srv.call(sse.backend.head))
    assert sse.stats().resume_gaps == gaps_before + 1

    # The gap's id is a real cursor: the next resume from it is exact.
    srv.call(sse.broadcast, "gap-a", "after-gap", 1)
    with open_stream(
        srv.url + "/subscribe", params={"channel": ["gap-a", "gap-b"]}, headers={"Last-Event-ID": gap.id}, opened=False
    ) as again:
        got = again.next_event()
    assert (got.event, got.json()) == ("after-gap", 1)


def test_history_trimmed_by_count_gaps_exactly_that_channel() -> None:
    with served(router_app(fast_settings(history_size=3))) as (srv, sse):
        cursor = srv.call(sse.publish, "count-a", "e", 0)
        for i in range(1, 6):
            srv.call(sse.broadcast, "count-a", "e", i)
        srv.call(sse.broadcast, "count-b", "e", "b1")
        srv.call(sse.broadcast_all, "e", "all1")
        with open_stream(
            srv.url + "/subscribe",
            params={"channel": ["count-a", "count-b"]},
            headers={"Last-Event-ID": cursor},
            opened=False,
        ) as stream:
            events = read_gap(stream)
            srv.call(sse.broadcast, "count-a", "live", 6)
            live = stream.next_event()
        assert [e.json() for e in events[:-1]] == ["b1", "all1"]
        assert events[-1].json() == {"channels": ["count-a"], "all": False, "last_event_id": cursor}
        assert live.json() == 6


def test_broadcast_all_history_trimmed_reports_all() -> None:
    with served(router_app(fast_settings(history_size=2))) as (srv, sse):
        cursor = srv.call(sse.publish, "mine", "e", 0)
        for i in range(3):
            srv.call(sse.broadcast_all, "e", i)
        with open_stream(
            srv.url + "/subscribe", params={"channel": "mine"}, headers={"Last-Event-ID": cursor}, opened=False
        ) as stream:
            gap = stream.next_event()
        assert gap.json() == {"channels": [], "all": True, "last_event_id": cursor}


def test_history_expired_by_age_gaps_exactly_that_channel() -> None:
    with served(router_app(fast_settings(history_ttl=0.3))) as (srv, sse):
        cursor = srv.call(sse.publish, "age-b", "e", "before")
        srv.call(sse.broadcast, "age-a", "e", "old")
        wait_until(
            lambda: srv.call(sse.backend.replay, ["age-a"], int(cursor)).gaps,
            message="the old event to expire",
        )
        srv.call(sse.broadcast, "age-b", "e", "fresh")
        srv.call(sse.broadcast_all, "e", "fresh-all")
        with open_stream(
            srv.url + "/subscribe",
            params={"channel": ["age-a", "age-b"]},
            headers={"Last-Event-ID": cursor},
            opened=False,
        ) as stream:
            events = read_gap(stream)
        assert [e.json() for e in events[:-1]] == ["fresh", "fresh-all"]
        assert events[-1].json() == {"channels": ["age-a"], "all": False, "last_event_id": cursor}


def test_broadcast_all_events_replay(server: Any) -> None:
    srv, sse = server
    cursor = srv.call(sse.publish_all, "e", "seen")
    srv.call(sse.broadcast_all, "announcement", {"n": 1})
    srv.call(sse.broadcast_all, "announcement", {"n": 2})
    with open_stream(
        srv.url + "/subscribe", params={"channel": "x-any"}, headers={"Last-Event-ID": cursor}, opened=False
    ) as stream:
        got = stream.events(2)
    assert [(e.event, e.json()) for e in got] == [("announcement", {"n": 1}), ("announcement", {"n": 2})]


def test_send_to_events_are_not_replayed(server: Any) -> None:
    srv, sse = server
    with open_stream(srv.url + "/subscribe", params={"channel": "direct"}) as first:
        client = wait_until(lambda: srv.call(sse.get_clients_by_channel, "direct"))[0]
        cursor = srv.call(sse.publish, "direct", "e", "seen")
        first.next_event()
        srv.call(sse.send_to, client.id, "private", "only-live")
        assert first.next_event().event == "private"
    srv.call(sse.broadcast, "direct", "e", "missed")
    with open_stream(
        srv.url + "/subscribe", params={"channel": "direct"}, headers={"Last-Event-ID": cursor}, opened=False
    ) as second:
        assert second.next_event().json() == "missed"


def test_resume_counts_in_stats(server: Any) -> None:
    srv, sse = server
    before = sse.stats().resumes
    cursor = srv.call(sse.publish, "count-resume", "e", 1)
    with open_stream(srv.url + "/subscribe", params={"channel": "count-resume"}, headers={"Last-Event-ID": cursor}):
        pass
    assert sse.stats().resumes == before + 1


def test_long_replay_arrives_whole_and_in_order(server: Any) -> None:
    srv, sse = server
    cursor = srv.call(sse.publish, "long", "e", "start")
    payload = "y" * 2000

    def publish_many() -> None:
        for i in range(150):
            sse.broadcast("long", "e", {"i": i, "pad": payload})

    srv.call(publish_many)
    with open_stream(
        srv.url + "/subscribe", params={"channel": "long"}, headers={"Last-Event-ID": cursor}, opened=False
    ) as stream:
        got = [e.json()["i"] for e in stream.events(150)]
        srv.call(sse.broadcast, "long", "e", {"i": "live"})
        assert stream.next_event().json() == {"i": "live"}
    assert got == list(range(150))


def test_non_ascii_caller_id_resumes_from_the_header_a_browser_sends(server: Any) -> None:
    # Regression: browsers send Last-Event-ID encoded as UTF-8, which the header
    # decoding read as Latin-1, so a non-ASCII id was unknown and the resume a gap.
    srv, sse = server
    srv.call(sse.publish, "intl", "e", "seen", "msg-é✓")
    srv.call(sse.publish, "intl", "e", "missed")
    with raw_stream(srv.port, "/subscribe?channel=intl", {"Last-Event-ID": "msg-é✓"}) as raw:
        body = raw.read_until(b'data: "missed"\n\n')
    assert [e.data for e in parse(body)] == ['"missed"']
    # Bytes that are not UTF-8 stay as read: an unknown id, so a gap, not an error.
    with raw_stream(srv.port, "/subscribe?channel=intl", {"Last-Event-ID": b"msg-\xe9"}) as raw:
        body = raw.read_until(b"event: gap\n")
    assert raw.status == 200
    with open_stream(
        srv.url + "/subscribe", params={"channel": "intl", "last_event_id": "msg-é✓"}, opened=False
    ) as stream:
        assert stream.next_event().json() == "missed"


def test_without_history_a_resume_reports_the_gap_instead_of_skipping() -> None:
    # Regression: with history_size=0 nothing was stored, and a resume found nothing
    # to replay and no gap either: the client silently missed the events.
    with served(router_app(fast_settings(history_size=0))) as (srv, sse):
        cursor = srv.call(sse.publish, "none-a", "e", 0)
        srv.call(sse.broadcast, "none-a", "e", 1)
        srv.call(sse.broadcast, "none-a", "e", 2)
        with open_stream(
            srv.url + "/subscribe",
            params={"channel": ["none-a", "none-b"]},
            headers={"Last-Event-ID": cursor},
            opened=False,
        ) as stream:
            gap = stream.next_event()
            srv.call(sse.broadcast, "none-a", "e", 3)
            live = stream.next_event()
        assert (gap.event, gap.json()) == (GAP_EVENT, {"channels": ["none-a"], "all": False, "last_event_id": cursor})
        assert live.json() == 3


# Repeated ids, and ids of channels a client does not read, on both backends.


def identify(request: Request) -> str | None:
    return request.query_params.get("user")


@pytest.fixture(scope="module", params=["memory", "redis"])
def any_backend(request: pytest.FixtureRequest) -> Iterator[Any]:
    values: dict[str, Any] = {}
    if request.param == "redis":
        redis = request.getfixturevalue("redis_server")
        values = {"backend": "redis", "redis_url": redis.url, "redis_key_prefix": f"test:{uuid.uuid4().hex[:10]}:"}
    with served(router_app(fast_settings(**values), identify=identify)) as pair:
        yield pair


def resume(srv: Any, channels: list[str], cursor: str, **params: str) -> Any:
    return open_stream(
        srv.url + "/subscribe",
        params={"channel": channels, **params},
        headers={"Last-Event-ID": cursor},
        opened=False,
    )


def test_an_id_repeated_on_a_channel_resumes_with_a_gap_not_a_skip(any_backend: Any) -> None:
    # Resuming from the first "dup-1" would skip "between"; from the second, repeat it.
    srv, sse = any_backend
    srv.call(sse.publish, "rep-a", "e", "first", "dup-1")
    srv.call(sse.publish, "rep-a", "e", "between")
    srv.call(sse.publish, "rep-a", "e", "second", "dup-1")
    with resume(srv, ["rep-a"], "dup-1") as stream:
        gap = stream.next_event()
    assert (gap.event, gap.json()) == (GAP_EVENT, {"channels": ["rep-a"], "all": True, "last_event_id": "dup-1"})


def test_an_id_on_two_of_the_clients_channels_resumes_with_a_gap(any_backend: Any) -> None:
    srv, sse = any_backend
    srv.call(sse.publish, "two-a", "e", "on a", "both-1")
    srv.call(sse.publish, "two-b", "e", "on b", "both-1")
    srv.call(sse.publish, "two-a", "e", "after")
    with resume(srv, ["two-a", "two-b"], "both-1") as stream:
        gap = stream.next_event()
    assert gap.event == GAP_EVENT and gap.json()["channels"] == ["two-a", "two-b"]
    # Through one of the channels alone the id is one event: the resume is exact.
    with resume(srv, ["two-a"], "both-1") as stream:
        got = stream.next_event()
    assert (got.event, got.json()) == ("e", "after")


def test_an_id_of_a_channel_the_client_does_not_read_is_answered_as_unknown(any_backend: Any) -> None:
    # Resume is no oracle: a client of "pub" cannot tell an id of "secret" from none.
    srv, sse = any_backend
    srv.call(sse.publish, "secret", "e", "hidden", "secret-1")
    srv.call(sse.publish, "pub", "e", "public")
    answers = []
    for cursor in ("secret-1", "never-published-1"):
        with resume(srv, ["pub"], cursor) as stream:
            gap = stream.next_event()
            answers.append((gap.event, {**gap.json(), "last_event_id": None}, gap.id == stream.last_event_id))
        srv.call(sse.publish, "pub", "e", "tick")
    assert answers[0] == answers[1]
    assert answers[0][:2] == (GAP_EVENT, {"channels": ["pub"], "all": True, "last_event_id": None})


def test_a_send_to_id_resumes_exactly_through_the_channels_and_identity(any_backend: Any) -> None:
    srv, sse = any_backend
    for params, other in (({"channel": "dm-a"}, {"channel": "dm-b"}), ({"user": "ann"}, {"user": "bob"})):
        with open_stream(srv.url + "/subscribe", params=params) as stream:
            (client,) = wait_until(lambda: srv.call(sse.get_clients), message="the client")
            srv.call(sse.publish_to, client.id, "private", "for you", f"direct-{client.id[-6:]}")
            got = stream.next_event()
            cursor = stream.last_event_id
        assert (got.event, got.id) == ("private", cursor)
        wait_until(lambda: not srv.call(sse.get_clients), message="the first stream to close")
        srv.call(sse.publish, "dm-a", "e", "missed")
        srv.call(sse.publish_all, "e", "missed too")
        # A new client id, the same channels (or identity): the resume is exact.
        with open_stream(
            srv.url + "/subscribe", params=params, headers={"Last-Event-ID": cursor}, opened=False
        ) as again:
            replayed = again.events(2 if "channel" in params else 1)
        assert [e.json() for e in replayed] == (["missed", "missed too"] if "channel" in params else ["missed too"])
        # Another client reads neither: to it the id is unknown.
        with open_stream(
            srv.url + "/subscribe", params=other, headers={"Last-Event-ID": cursor}, opened=False
        ) as stranger:
            assert stranger.next_event().event == GAP_EVENT
        wait_until(lambda: not srv.call(sse.get_clients), message="the streams to close")
