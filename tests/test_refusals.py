"""A real EventSource client (npm ``eventsource``) refused for load or met by a stopping
worker reconnects by itself later; only a hard refusal switches it off."""

from __future__ import annotations

import json

import httpx
from helpers.apps import fast_settings, router_app, served
from helpers.eventsource import eventsource
from helpers.servers import free_port, serve_process
from helpers.streams import open_stream, wait_until

CONNECTING, CLOSED = 0, 2


def test_a_client_refused_at_max_connections_keeps_coming_back_until_it_gets_in() -> None:
    settings = fast_settings(max_connections=1, retry_interval=0.05)
    with (
        served(router_app(settings)) as (srv, sse),
        open_stream(f"{srv.url}/subscribe", params={"channel": "c"}),
        eventsource(f"{srv.url}/subscribe?channel=c", "browser") as client,
    ):
        # Refused twice, each time told to come back, and it does by itself.
        for _ in range(2):
            client.expect("request")
            assert client.expect("error")["readyState"] == CONNECTING
        assert srv.call(lambda: sse.stats().refused["max_connections"]) >= 2
        # The slot frees (the other stream ends): a later try of its own gets in.
        (occupied,) = srv.call(sse.get_clients_by_channel, "c")
        srv.call(sse.remove_client, occupied.id)
        wait_until(lambda: srv.call(sse.get_clients_by_channel, "c"), message="the client to get in")
        srv.call(sse.broadcast, "c", "e", {"in": True})
        assert json.loads(client.expect("e")["data"]) == {"in": True}
    assert all(r["readyState"] == CONNECTING for r in client.of("error"))


def test_a_hard_refusal_switches_the_client_off() -> None:
    settings = fast_settings(max_connections=1, retry_interval=0.05, hard_refusals=True)
    with served(router_app(settings)) as (srv, sse), open_stream(f"{srv.url}/subscribe", params={"channel": "c"}):
        with eventsource(f"{srv.url}/subscribe?channel=c", "browser") as client:
            # A non-200 answer fails the connection: CLOSED, and an EventSource never retries.
            assert client.expect("error")["readyState"] == CLOSED
        assert srv.call(lambda: sse.stats().refused["max_connections"]) == 1


def test_a_client_of_a_stopping_worker_reconnects_to_the_next_one_by_itself() -> None:
    port = free_port()
    env = {"SSE_RETRY_INTERVAL": "0.1", "SSE_DRAIN_WINDOW": "0.2", "SSE_HEARTBEAT_INTERVAL": "60"}
    url = f"http://127.0.0.1:{port}"
    with (
        serve_process("tests.helpers.process_app:app", env, port=port) as (_, first),
        eventsource(f"{url}/subscribe?channel=deploy", "browser") as client,
    ):
        client.expect("open")
        httpx.post(f"{url}/publish", params={"channel": "deploy", "event": "e"}).raise_for_status()
        assert json.loads(client.expect("e")["data"]) == {"i": 0}
        first.terminate()
        first.wait(10)
        # The stream ended cleanly, then the worker was gone: the client keeps trying.
        assert client.expect("error")["readyState"] == CONNECTING
        client.expect("request")
        with serve_process("tests.helpers.process_app:app", env, port=port):
            client.expect("open")
            httpx.post(f"{url}/publish", params={"channel": "deploy", "event": "e"}).raise_for_status()
            assert json.loads(client.expect("e")["data"]) == {"i": 0}
    assert all(r["readyState"] == CONNECTING for r in client.of("error"))
