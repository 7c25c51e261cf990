"""A worker of a cluster test: the router's subscribe endpoint plus routes to publish
and to look at this worker. Every setting comes from ``SSE_*`` variables, so tests
run several of these on one Redis with ``SSE_BACKEND=redis``.

``GET /subscribe?channel=..&user=..`` opens a stream (``user`` is the identity);
``POST /publish`` publishes (``wait=1`` awaits the backend, otherwise fire-and-forget).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Query, Request

from fastapi_sse import BackendError, SSEDep, allow_all, create_sse_router


def identify(request: Request) -> str | None:
    return request.query_params.get("user")


app = FastAPI()
app.include_router(create_sse_router(authorize=allow_all, identify=identify, admin_dependencies=[]))


@app.get("/own")
async def own(request: Request, sse: SSEDep, channel: list[str] = Query()) -> Any:
    """An app's own endpoint: ``add_client`` with the browser's ``Last-Event-ID``."""
    client, response = sse.add_client(request.headers.get("last-event-id"))
    for name in channel:
        sse.subscribe(client.id, name)
    return response


@app.post("/publish")
async def publish(
    sse: SSEDep, event: str, data: str, channel: str | None = None, to: str | None = None, wait: bool = False
) -> dict[str, Any]:
    """Publish ``data`` on ``channel``, to every client (no channel), or to client ``to``."""
    if wait:
        try:
            if to is not None:
                return {"id": await sse.publish_to(to, event, data)}
            if channel is None:
                return {"id": await sse.publish_all(event, data)}
            return {"id": await sse.publish(channel, event, data)}
        except BackendError as exc:
            return {"error": str(exc)}
    if to is not None:
        return {"sent": sse.send_to(to, event, data)}
    if channel is None:
        sse.broadcast_all(event, data)
    else:
        sse.broadcast(channel, event, data)
    return {"sent": True}


@app.get("/local")
async def local(sse: SSEDep) -> dict[str, Any]:
    """This worker's own view: its clients and counters."""
    stats = sse.stats()
    return {
        "worker_id": sse.worker_id,
        "clients": {c.id: sorted(c.channels) for c in sse.get_clients()},
        "listening": sorted(getattr(sse.backend, "_listened", {})),
        "reconnects": sse.backend.reconnects,
        "pending_publishes": stats.pending_publishes,
        "disconnects": stats.disconnects,
    }


@app.post("/runs")
async def start_run(sse: SSEDep, count: int, pace: float = 0.0, run_id: str | None = None) -> dict[str, str]:
    """Start a run producing ``count`` tokens, one every ``pace`` seconds (``count=0``:
    until cancelled), in a task of this worker."""
    run = await sse.runs.open(run_id)

    async def produce() -> None:
        async with run:
            n = 0
            while count == 0 or n < count:
                await run.send("token", {"n": n})
                n += 1
                await asyncio.sleep(pace)
            await run.finish({"tokens": n})

    _producers.add(asyncio.get_running_loop().create_task(produce()))
    return {"run_id": run.id}


_producers: set[asyncio.Task[None]] = set()


@app.get("/presence")
async def presence(sse: SSEDep, channel: str) -> dict[str, Any]:
    """Who is on ``channel``, on every worker."""
    return (await sse.presence.snapshot(channel)).model_dump()
