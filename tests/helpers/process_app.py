"""An app for ``uvicorn tests.helpers.process_app:app`` in a subprocess; settings come from ``SSE_*``."""

from __future__ import annotations

from fastapi import FastAPI

from fastapi_sse import SSEDep, allow_all, create_sse_router

app = FastAPI()
app.include_router(create_sse_router(authorize=allow_all))


@app.post("/publish")
def publish(sse: SSEDep, channel: str, count: int = 1, event: str = "tick") -> dict[str, int]:
    for i in range(count):
        sse.broadcast(channel, event, {"i": i})
    return {"published": count}
