"""Slow consumers and every configured limit, over HTTP and on the service directly."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest
from helpers.apps import fast_settings, router_app, served
from helpers.streams import (
    RawReader,
    Stream,
    dechunk,
    open_stream,
    parse,
    raw_request,
    retry_of,
    soft_refusal,
    wait_until,
)

from fastapi_sse import BadRequestError, InvalidChannelError, LimitExceededError, SSEClient, Text

BUFFER = 64 * 1024
EVENT = Text("x" * 30_000)


class Reader(threading.Thread):
    """Reads a parsed stream in the background until the ``end`` event."""

    def __init__(self, stream: Stream) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.ids: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while True:
                event = self.stream.next_event()
                self.ids.append(event.id)
                if event.event == "end":
                    return
        except BaseException as exc:  # reported by the test
            self.error = exc


def stall_until(srv: Any, sse: Any, policy: str, stalled: SSEClient, readers: list[Reader]) -> tuple[int, int]:
    """Publish in small batches the readers keep up with, until the stalled client feels
    the policy; returns (events published, largest buffer seen)."""
    published = 0
    largest = 0
    while True:
        for _ in range(10):
            srv.call(sse.broadcast, "slow", "big", EVENT)
        published += 10
        for reader in readers:
            wait_until(lambda r=reader, n=published: len(r.ids) >= n or r.error, message="readers to keep up")
            assert reader.error is None, reader.error
        largest = max(largest, srv.call(lambda: stalled.buffered_bytes))
        assert largest <= BUFFER
        done = stalled.closed if policy == "disconnect" else stalled.dropped > 20
        if done:
            return published, largest
        assert published < 2000, "the stalled client never overflowed"


@pytest.mark.parametrize("policy", ["disconnect", "drop_oldest", "drop_newest"])
def test_stalled_client_does_not_hold_back_readers_and_stays_bounded(
    policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = fast_settings(max_buffer_bytes=BUFFER, overflow_policy=policy)
    with served(router_app(settings)) as (srv, sse):
        sock, head = raw_request(srv.port, "/subscribe?channel=slow", rcvbuf=4096)
        try:
            assert head is not None and head.status == 200
            stalled = wait_until(lambda: srv.call(sse.get_clients_by_channel, "slow"))[0]
            with (
                open_stream(srv.url + "/subscribe", params={"channel": "slow"}) as one,
                open_stream(srv.url + "/subscribe", params={"channel": "slow"}) as two,
            ):
                readers = [Reader(one), Reader(two)]
                for reader in readers:
                    reader.start()
                published, largest = stall_until(srv, sse, policy, stalled, readers)
                stats = sse.stats()
                # Nothing is dropped silently: counted above, logged here.
                logged = "disconnected after" if policy == "disconnect" else f"overflow_policy={policy}"
                assert f"client {stalled.id} is reading too slowly" in caplog.text
                assert logged in caplog.text
                if policy == "disconnect":
                    assert stats.slow_consumer_disconnects == 1
                    assert stats.disconnects["slow_consumer"] == 1
                    assert srv.call(sse.get_client, stalled.id) is None
                    assert stalled.buffered_bytes == 0
                    drain = RawReader(sock, None)
                    drain.start()
                else:
                    assert stats.events_dropped == stalled.dropped > 0
                    assert stats.slow_consumer_disconnects == 0
                    assert srv.call(sse.get_client, stalled.id) is stalled
                    assert largest > BUFFER - len(EVENT) - 200
                    drain = RawReader(sock, b"event: end\n")
                    drain.start()
                    wait_until(lambda: srv.call(lambda: stalled.buffered_bytes) == 0 and not stalled.sending)
                srv.call(sse.broadcast, "slow", "end", Text("end"))
                for reader in readers:
                    reader.join(10)
                    assert reader.error is None, reader.error
                    assert len(reader.ids) == published + 1
                assert readers[0].ids == readers[1].ids
                drain.join(10)
                assert not drain.is_alive()
            got = [e.id for e in parse(dechunk(head.body + drain.data))]
            everything = readers[0].ids
            assert got == [i for i in everything if i in set(got)]  # in order, complete events only
            if policy == "disconnect":
                assert drain.eof
                assert "end" not in got
            else:
                assert got[-1] == everything[-1]
                assert len(everything) - len(got) == stalled.dropped
                # The last big event came while the buffer was full: drop_oldest made room
                # for it, drop_newest dropped it.
                assert (everything[-2] in got) is (policy == "drop_oldest")
        finally:
            sock.close()


def test_max_connections_refuses_softly_so_the_browser_comes_back(http: httpx.Client) -> None:
    with served(router_app(fast_settings(max_connections=2, retry_interval=2.5))) as (srv, sse):
        with (
            open_stream(srv.url + "/subscribe", params={"channel": "c"}),
            open_stream(srv.url + "/subscribe", params={"channel": "c"}),
        ):
            response = http.get(srv.url + "/subscribe", params={"channel": "c"})
            assert "max_connections=2" in soft_refusal(response)
            assert retry_of(response) == 2500
            client, _ = srv.call(sse.add_client)
            assert (client.closed, client.close_reason) == (True, "refused")
            assert srv.call(sse.subscribe, client.id, "c") is False
        assert sse.stats().refused["max_connections"] == 2
        wait_until(lambda: not srv.call(sse.get_clients))
        with open_stream(srv.url + "/subscribe", params={"channel": "c"}):
            pass


def test_hard_refusals_answer_503_with_retry_after(http: httpx.Client) -> None:
    settings = fast_settings(max_connections=1, retry_interval=2.5, hard_refusals=True)
    with served(router_app(settings)) as (srv, sse), open_stream(srv.url + "/subscribe", params={"channel": "c"}):
        response = http.get(srv.url + "/subscribe", params={"channel": "c"})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "3"
        assert "max_connections=1" in response.json()["detail"]
        with pytest.raises(LimitExceededError) as info:
            srv.call(sse.add_client)
        assert (info.value.limit, info.value.status_code) == ("max_connections", 503)


def identified_app(**settings: Any) -> Any:
    return router_app(fast_settings(**settings), identify=lambda request: request.headers.get("x-user"))


def test_identity_limit_remove_oldest_ends_the_oldest_stream() -> None:
    with served(identified_app(max_connections_per_identity=2)) as (srv, sse):
        user = {"x-user": "alice"}
        with (
            open_stream(srv.url + "/subscribe", params={"channel": "i"}, headers=user) as oldest,
            open_stream(srv.url + "/subscribe", params={"channel": "i"}, headers=user) as middle,
            open_stream(srv.url + "/subscribe", params={"channel": "i"}, headers={"x-user": "bob"}) as other,
        ):
            srv.call(sse.broadcast, "i", "before", 1)
            assert oldest.next_event().event == "before"
            with open_stream(srv.url + "/subscribe", params={"channel": "i"}, headers=user) as newest:
                assert oldest.rest() == []  # ended cleanly, after its complete events
                srv.call(sse.broadcast, "i", "after", 2)
                assert [e.event for e in middle.events(2)] == ["before", "after"]
                assert newest.next_event().event == "after"
                assert [e.event for e in other.events(2)] == ["before", "after"]
                assert [c.identity for c in srv.call(sse.get_clients)] == ["alice", "bob", "alice"]
        assert sse.stats().disconnects["replaced"] == 1
        wait_until(
            lambda: not srv.call(sse.get_clients_by_identity, "alice") + srv.call(sse.get_clients_by_identity, "bob"),
            message="identity entries to go",
        )


def test_identity_limit_refuse_tells_the_stream_to_come_back(http: httpx.Client) -> None:
    with served(identified_app(max_connections_per_identity=1, identity_limit_policy="refuse")) as (srv, sse):
        with open_stream(srv.url + "/subscribe", params={"channel": "i"}, headers={"x-user": "carol"}) as first:
            response = http.get(srv.url + "/subscribe", params={"channel": "i"}, headers={"x-user": "carol"})
            assert "max_connections_per_identity=1" in soft_refusal(response)
            client, _ = srv.call(lambda: sse.add_client(identity="carol"))
            assert client.close_reason == "refused"
            srv.call(sse.broadcast, "i", "still-open", 1)
            assert first.next_event().event == "still-open"
        assert sse.stats().refused["max_connections_per_identity"] == 2


def test_max_channels_per_connection(http: httpx.Client) -> None:
    app = router_app(fast_settings(max_channels_per_connection=3), default_channels=lambda request: ["mine"])
    with served(app) as (srv, sse):
        response = http.get(srv.url + "/subscribe", params={"channel": ["a", "b", "c"]})
        assert response.status_code == 400
        assert "max_channels_per_connection" in response.json()["detail"]
        assert srv.call(sse.get_clients) == []
        with open_stream(srv.url + "/subscribe", params={"channel": ["a", "b", "a"]}):
            client = srv.call(sse.get_clients)[0]
            assert client.channels == {"mine", "a", "b"}
            with pytest.raises(LimitExceededError, match="max_channels_per_connection") as info:
                srv.call(sse.subscribe, client.id, "d")
            assert info.value.status_code == 400
            assert srv.call(sse.subscribe, client.id, "a") is True  # already subscribed: no new slot


@pytest.mark.parametrize(
    ("channel", "message"),
    [
        ("x" * 11, "max_channel_length=10"),
        ("has space", "pattern"),
        ("$all", "pattern"),
        ("-leading", "pattern"),
        ("new\nline", "pattern"),
    ],
)
def test_channel_name_rules(http: httpx.Client, channel: str, message: str) -> None:
    with served(router_app(fast_settings(max_channel_length=10))) as (srv, sse):
        response = http.get(srv.url + "/subscribe", params={"channel": channel})
        assert response.status_code == 400
        assert message in response.json()["detail"]
        assert srv.call(sse.get_clients) == []
        for call in (
            lambda: sse.check_channel(channel),
            lambda: sse.broadcast(channel, "e", 1),
        ):
            with pytest.raises(InvalidChannelError, match=message):
                call()
        with pytest.raises(InvalidChannelError):
            srv.call(sse.publish, channel, "e", 1)
    with pytest.raises(InvalidChannelError, match="non-empty"):
        sse.check_channel("")


@pytest.mark.parametrize(
    ("cursor", "message"),
    [("x" * 129, "max_last_event_id_length=128"), ("a\x01b", "control characters"), ("a\x7fb", "control")],
)
def test_last_event_id_is_validated(http: httpx.Client, cursor: str, message: str) -> None:
    with served(router_app()) as (srv, sse):
        response = http.get(srv.url + "/subscribe", params={"channel": "c", "last_event_id": cursor})
        assert response.status_code == 400
        assert message in response.json()["detail"]
        if "\x01" not in cursor and "\x7f" not in cursor:
            response = http.get(srv.url + "/subscribe", params={"channel": "c"}, headers={"Last-Event-ID": cursor})
            assert response.status_code == 400
            assert message in response.json()["detail"]
        with pytest.raises(BadRequestError, match=message) as info:
            srv.call(lambda: sse.add_client(cursor))
        assert info.value.status_code == 400
        assert isinstance(info.value, ValueError)
        assert srv.call(sse.get_clients) == []


def test_client_stuck_in_one_send_is_disconnected_after_send_timeout(caplog: pytest.LogCaptureFixture) -> None:
    # A buffer large enough never to overflow: only the send timeout can catch this client.
    settings = fast_settings(max_buffer_bytes=64 * 1024 * 1024, send_timeout=0.3, heartbeat_interval=0.2)
    with served(router_app(settings)) as (srv, sse):
        sock, head = raw_request(srv.port, "/subscribe?channel=stuck", rcvbuf=4096)
        try:
            assert head is not None and head.status == 200
            stalled = wait_until(lambda: srv.call(sse.get_clients_by_channel, "stuck"))[0]

            def flood() -> None:
                for _ in range(300):
                    sse.broadcast("stuck", "big", EVENT)

            srv.call(flood)
            wait_until(lambda: stalled.closed, message="the stuck client to be disconnected")
            assert stalled.close_reason == "slow_consumer"
            assert f"client {stalled.id} is reading too slowly" in caplog.text
            assert "send_timeout=0.3s" in caplog.text
            assert sse.stats().slow_consumer_disconnects == 1
            assert stalled.buffered_bytes == 0
            with open_stream(srv.url + "/subscribe", params={"channel": "stuck"}) as stream:
                srv.call(sse.broadcast, "stuck", "e", "others unaffected")
                assert stream.next_event().json() == "others unaffected"
        finally:
            sock.close()
