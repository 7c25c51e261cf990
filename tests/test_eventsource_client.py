"""Ids come back exactly through a real EventSource client's own reconnects
(the npm ``eventsource`` package, run by node; tests/js/resume.mjs)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers.apps import fast_settings, router_app, served
from helpers.eventsource import eventsource

ASCII_IDS = ["msg-1", "!#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "a b  c", "x" * 128]
LATIN1_IDS = ["évt-1", "ÿ-ü é"]
WIDE_IDS = ["事件-2", "🎉-3 🚀", "事" * 127 + "!"]


@pytest.mark.parametrize(
    ("mode", "ids"),
    [("browser", ASCII_IDS + LATIN1_IDS + WIDE_IDS), ("package", ASCII_IDS + LATIN1_IDS)],
)
def test_every_kind_of_accepted_id_resumes_exactly_through_eventsource_reconnects(mode: str, ids: list[str]) -> None:
    channel = f"js-{mode}"
    with (
        served(router_app(fast_settings(retry_interval=0.05))) as (srv, sse),
        eventsource(f"{srv.url}/subscribe?channel={channel}", mode) as client,
    ):
        client.expect("open")
        sent = [(ids[0], {"n": 0})]
        srv.call(sse.publish, channel, "e", {"n": 0}, ids[0])
        assert client.expect("e")["id"] == ids[0]

        for n, event_id in enumerate([*ids[1:], None], start=1):

            async def end_stream_then_publish(n: int = n, event_id: str | None = event_id) -> list[tuple[str, Any]]:
                # One turn of the server's loop: the client gets these only by resuming.
                (connected,) = sse.get_clients_by_channel(channel)
                sse.remove_client(connected.id)
                between = await sse.publish(channel, "e", {"n": n, "between": True})
                own = await sse.publish(channel, "e", {"n": n}, event_id)
                return [(between, {"n": n, "between": True}), (own, {"n": n})]

            resumed_from = sent[-1][0]
            sent += srv.call(end_stream_then_publish)
            request = client.expect("request")
            client.expect("open")
            client.expect("e")
            client.expect("e")
            # The client sent back exactly the id it last saw, and the server knew it.
            assert request["lastEventId"] == resumed_from

        srv.call(sse.publish, channel, "e", {"n": "live"}, "last-live")
        client.expect("e")

    received = [(r["id"], json.loads(r["data"])) for r in client.of("e")]
    assert received == [*sent, ("last-live", {"n": "live"})]
    assert client.of("gap") == []
    assert len(client.of("open")) == len(ids) + 1
    # Every error is the end of a stream followed by a reconnect, never a refusal.
    assert all(r["readyState"] == 0 for r in client.of("error"))
