"""The quick start's app with the benchmark routes (``bench/apps/common.py``) and two
more for the Redis Cluster benchmark (``bench/cluster.py``), on whichever backend the
``SSE_*`` variables choose:

- ``POST /publish_wait?channel=c&start=i`` awaits one publish (the backend has stored
  and announced it) and answers the seconds the await took;
- ``POST /publish_batch?channel=a&channel=b&n=N&start=i`` publishes N events on each
  channel, interleaved, in one awaited ``publish_many``.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Query

from bench.apps.common import add_bench_routes, dumps, payload
from fastapi_sse import SSEDep, Text, allow_all, create_sse_router, get_sse_from_app

app = FastAPI()
app.include_router(create_sse_router(authorize=allow_all, subscribe_path="/sse"))


def broadcast(channel: str, data: str) -> None:
    get_sse_from_app(app).broadcast(channel, "bench", Text(data))


add_bench_routes(
    app,
    broadcast=broadcast,
    send_to_user=lambda user, data: False,
    clients=lambda: len(get_sse_from_app(app).get_clients()),
)


@app.post("/publish_wait")
async def publish_wait(sse: SSEDep, channel: str, start: int = 0, size: int = 64) -> dict[str, Any]:
    data = Text(dumps(payload(start, "x" * size)))
    began = time.perf_counter()
    event_id = await sse.publish(channel, "bench", data)
    return {"id": event_id, "seconds": time.perf_counter() - began}


@app.post("/publish_batch")
async def publish_batch(
    sse: SSEDep, n: int, channel: list[str] = Query(), start: int = 0, size: int = 64
) -> dict[str, Any]:
    pad = "x" * size
    events = [
        (name, "bench", Text(dumps(payload(start + k * len(channel) + c, pad))))
        for k in range(n)
        for c, name in enumerate(channel)
    ]
    ids = await sse.publish_many(events)
    return {"published": len(ids)}
