import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn
from fastapi import FastAPI
from httpx_sse import connect_sse


@contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """Run the app with uvicorn on a free loopback port, in a thread; yield its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=asyncio.run, args=(server.serve(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:  # uvicorn has no "started" event: poll its flag
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def check_order_shipped_reaches_the_subscriber(url: str) -> None:
    with (
        httpx.Client(base_url=url, timeout=5) as client,
        connect_sse(client, "GET", "/subscribe", params={"channel": "order:17"}) as source,
    ):
        # The stream is subscribed once its headers arrived: publish now.
        client.post("/orders/17/ship")
        # Wait by reading: the read timeout is the deadline.
        event = next(e for e in source.iter_sse() if e.event == "orderShipped")
        assert event.json() == {"orderId": "17"}
