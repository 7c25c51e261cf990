"""A stopping worker spreads its streams' reconnects: retry hints jittered per stream,
and SIGTERM ends the streams in waves over ``drain_window``."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from helpers.servers import serve_process

STREAMS = 1000
WINDOW = 1.0


async def open_raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """A stream on a raw socket: returns it once its opening (the retry hint) is read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /subscribe?channel=s HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n", 1)[0], head
    body = b""
    while b"retry: " not in body or b"\n\n" not in body.split(b"retry: ", 1)[1]:
        body += await reader.read(4096)
    retry = int(body.split(b"retry: ", 1)[1].split(b"\n", 1)[0])
    return reader, writer, retry


async def ended_at(reader: asyncio.StreamReader) -> float:
    """When the server ended the stream: the last chunk of its body, or the socket's end."""
    buffer = b""
    while not buffer.endswith(b"0\r\n\r\n"):
        data = await reader.read(65536)
        if not data:
            break
        buffer = buffer[-16:] + data
    return time.monotonic()


# Hypercorn's parent takes the signal and tells its worker process through an event:
# the service notices its worker stopping and drains just the same.
SERVERS = {"uvicorn": ("--timeout-graceful-shutdown", "10"), "hypercorn": ("--graceful-timeout", "10")}


@pytest.mark.parametrize("server", SERVERS)
def test_sigterm_spreads_the_ends_of_1000_streams_and_their_retry_hints(server: str) -> None:
    env = {
        "SSE_DRAIN_WINDOW": str(WINDOW),
        "SSE_RETRY_INTERVAL": "1",
        "SSE_RETRY_JITTER": "0.5",
        "SSE_HEARTBEAT_INTERVAL": "60",
    }
    with serve_process("tests.helpers.process_app:app", env, *SERVERS[server], server=server) as (url, proc):
        port = int(url.rsplit(":", 1)[1])

        async def scenario() -> tuple[list[int], list[float]]:
            streams = [await open_raw(port) for _ in range(STREAMS)]
            proc.send_signal(signal.SIGTERM)
            ends = await asyncio.wait_for(asyncio.gather(*(ended_at(r) for r, _, _ in streams)), 30)
            for _, writer, _ in streams:
                writer.close()
            return [retry for _, _, retry in streams], list(ends)

        retries, ends = asyncio.run(scenario())
        assert proc.wait(15) == (-signal.SIGTERM if server == "uvicorn" else 0)
    # Each stream has its own delay in [0.5 s, 1.5 s]: no two pages come back in lockstep.
    assert 500 <= min(retries) < 600 and 1400 < max(retries) <= 1500
    assert len(set(retries)) > STREAMS // 2
    # The ends are spread over the window, no tenth of it ending much more than its share.
    first = min(ends)
    span = max(ends) - first
    assert span >= 0.7 * WINDOW, span
    assert spread(ends) <= STREAMS * 0.25, spread(ends)
    # So a browser comes back at its end plus its own delay: those times spread too.
    back = [end + retry / 1000 for end, retry in zip(ends, retries, strict=True)]
    assert spread(back) <= STREAMS * 0.25, spread(back)


def spread(times: list[float]) -> int:
    """The most of ``times`` falling in one tenth of their span."""
    first, span = min(times), max(times) - min(times)
    tenths = [0] * 10
    for t in times:
        tenths[min(9, int((t - first) / span * 10))] += 1
    return max(tenths)
