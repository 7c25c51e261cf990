"""The quick start's app plus producers for the runs benchmark. ``POST /run`` opens a
run whose producer waits for ``POST /run/go`` and then sends ``tokens`` events as fast
as it can (``pace`` seconds apart, ``tokens=0``: until cancelled); ``POST /channel``
sends the same events through a plain channel (``c``) and then an ``end`` event: the
floor that a run's storage and lease are measured against."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI

from fastapi_sse import SSEDep, Text, allow_all, create_sse_router

app = FastAPI()
app.include_router(create_sse_router(authorize=allow_all))
_gates: dict[str, asyncio.Event] = {}
_tasks: set[asyncio.Task[None]] = set()


def _token(n: int, size: int) -> Text:
    return Text(f"{n:07d}" + "x" * max(0, size - 7))


@app.post("/run")
async def run(sse: SSEDep, run_id: str, tokens: int, size: int = 16, pace: float = 0.0) -> dict[str, Any]:
    produced = await sse.runs.open(run_id)
    gate = _gates[run_id] = asyncio.Event()

    async def produce() -> None:
        await gate.wait()
        async with produced:
            n = 0
            while tokens == 0 or n < tokens:
                await produced.send("token", _token(n, size))
                n += 1
                if pace:
                    await asyncio.sleep(pace)

    task = asyncio.get_running_loop().create_task(produce())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return {"run_id": produced.id}


@app.post("/run/go")
async def go(run_id: str) -> dict[str, Any]:
    _gates.pop(run_id).set()
    return {"run_id": run_id}


@app.post("/channel")
async def channel(sse: SSEDep, tokens: int, size: int = 16) -> dict[str, Any]:
    for n in range(tokens):
        await sse.publish("c", "token", _token(n, size))
    await sse.publish("c", "end", {"status": "done"})
    return {"sent": tokens}
