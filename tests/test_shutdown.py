"""Shutdown: ``shutdown()`` and a signalled uvicorn end every stream after complete events."""

from __future__ import annotations

import asyncio
import signal
import threading
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from helpers.apps import fast_settings, router_app, served
from helpers.servers import serve_process
from helpers.streams import open_stream, raw_stream, soft_refusal, wait_until

from fastapi_sse import SSEService


def test_shutdown_ends_every_stream_after_its_complete_events(http: httpx.Client) -> None:
    with served(router_app(fast_settings(retry_interval=1.5))) as (srv, sse):
        with (
            open_stream(srv.url + "/subscribe", params={"channel": "a"}) as one,
            open_stream(srv.url + "/subscribe", params={"channel": ["a", "b"]}) as two,
            raw_stream(srv.port, "/subscribe?channel=b") as raw,
        ):
            raw.read_until(b"\n\nid: ")
            wait_until(lambda: len(srv.call(sse.get_clients)) == 3)

            def publish_then_shutdown() -> None:
                for i in range(20):
                    sse.broadcast("a", "e", i)
                    sse.broadcast("b", "e", -i)
                sse.shutdown()

            srv.call(publish_then_shutdown)
            assert [e.json() for e in one.rest()] == list(range(20))
            assert len(two.rest()) == 40
            body = raw.read_to_end()
            assert raw.complete  # the terminating chunk: a clean end, not a cut connection
            assert body.endswith(b"data: -19\n\n")
            refused = http.get(srv.url + "/subscribe", params={"channel": "a"})
            assert "shutting down" in soft_refusal(refused)
        assert sse.stats().disconnects["shutdown"] == 3
        assert srv.call(sse.get_clients) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_uvicorn_exits_promptly_on_signal_with_open_streams(signum: int) -> None:
    env = {"SSE_HEARTBEAT_INTERVAL": "0.2", "SSE_RETRY_INTERVAL": "0.5", "SSE_DRAIN_WINDOW": "0.3"}
    with serve_process("tests.helpers.process_app:app", env) as (url, proc), ExitStack() as stack:
        streams = [stack.enter_context(open_stream(url + "/subscribe", params={"channel": "s"})) for _ in range(3)]
        with httpx.Client() as http:
            assert http.post(url + "/publish", params={"channel": "s", "count": 5}).json() == {"published": 5}
        for stream in streams:
            assert [e.json()["i"] for e in stream.events(5)] == [0, 1, 2, 3, 4]
        proc.send_signal(signum)
        for stream in streams:
            # A clean end of stream: httpx would raise on a cut chunked body.
            assert stream.rest() == []
        # uvicorn re-raises SIGTERM once its graceful shutdown is done; SIGINT ends with 0.
        assert proc.wait(5) == (-signal.SIGTERM if signum == signal.SIGTERM else 0)
        assert proc.stdout is not None
        output = proc.stdout.read().decode()
    assert "Traceback" not in output, output
    assert "ERROR" not in output, output


def test_signal_handlers_end_streams_and_chain_to_the_previous_handler() -> None:
    received: list[int] = []

    def previous(signum: int, frame: Any) -> None:
        received.append(signum)

    original = signal.signal(signal.SIGTERM, previous)
    try:

        async def scenario() -> None:
            async with SSEService(fast_settings()) as sse:
                sse.install_signal_handlers()
                sse.install_signal_handlers()  # idempotent: the previous handler is kept once
                client, _ = sse.add_client()
                signal.raise_signal(signal.SIGTERM)
                # The handler schedules shutdown() on the loop; callbacks run in order,
                # so once this one has run, so has shutdown().
                after = asyncio.get_running_loop().create_future()
                asyncio.get_running_loop().call_soon(after.set_result, None)
                await asyncio.wait_for(after, 5)
                assert client.closed
                assert client.close_reason == "shutdown"
                assert received == [signal.SIGTERM]
                # Off the main thread both calls are no-ops.
                worker = threading.Thread(target=lambda: (sse.install_signal_handlers(), sse.restore_signal_handlers()))
                worker.start()
                worker.join()
                assert signal.getsignal(signal.SIGTERM) is not previous
            assert signal.getsignal(signal.SIGTERM) is previous  # restored by aclose

        asyncio.run(scenario())
    finally:
        signal.signal(signal.SIGTERM, original)
