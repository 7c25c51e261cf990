"""What the deployment page says about headers and compression holds on a real server."""

from __future__ import annotations

import json

import httpx
from fastapi import FastAPI
from fastapi.middleware.gzip import GZipMiddleware
from helpers.paths import ROOT
from helpers.servers import serve
from helpers.streams import open_stream

from fastapi_sse import SSEDep, allow_all, create_sse_router

PAGE = (ROOT / "docs" / "deployment.md").read_text()


def gzip_app() -> FastAPI:
    app = FastAPI()
    app.include_router(create_sse_router(authorize=allow_all))
    app.add_middleware(GZipMiddleware, minimum_size=1)

    @app.post("/publish")
    async def publish(sse: SSEDep) -> None:
        sse.broadcast("a", "news", {"text": "x" * 2000})

    @app.get("/big")
    async def big() -> dict[str, str]:
        return {"text": "x" * 2000}

    return app


def test_streams_carry_the_headers_the_page_names() -> None:
    assert "`Cache-Control: no-store`" in PAGE and "`X-Accel-Buffering: no`" in PAGE
    with serve(gzip_app()) as served, open_stream(f"{served.url}/subscribe?channel=a") as s:
        assert s.response.headers["cache-control"] == "no-store"
        assert s.response.headers["x-accel-buffering"] == "no"


def test_gzip_middleware_leaves_the_stream_uncompressed_and_prompt() -> None:
    assert "since Starlette 0.46.0" in PAGE
    headers = {"Accept-Encoding": "gzip"}
    with serve(gzip_app()) as served, httpx.Client(timeout=10) as http:
        # The middleware is on: an ordinary response is compressed.
        assert http.get(f"{served.url}/big", headers=headers).headers["content-encoding"] == "gzip"
        with open_stream(f"{served.url}/subscribe?channel=a", headers=headers) as s:
            assert "content-encoding" not in s.response.headers
            http.post(f"{served.url}/publish")
            event = s.next_event()  # arrives at once, not at a compression flush
            assert json.loads(event.data) == {"text": "x" * 2000}
