"""Test apps built the way users build them: the router factory, or a route of the app's own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request

from fastapi_sse import (
    EventTypes,
    SSEDep,
    SSEResponse,
    SSEService,
    SSESettings,
    allow_all,
    create_sse_router,
    get_sse_from_app,
    sse_lifespan,
)

from .servers import Served, serve


def fast_settings(**overrides: Any) -> SSESettings:
    """Settings with intervals small enough for tests (no heartbeat unless asked)."""
    values: dict[str, Any] = {
        "heartbeat_interval": 3600.0,
        "retry_interval": 0.5,
        "drain_window": 0.0,
        "retry_jitter": 0.0,
    }
    values.update(overrides)
    return SSESettings(**values)


def router_app(settings: SSESettings | None = None, **router_kwargs: Any) -> FastAPI:
    """An app whose only routes come from ``create_sse_router``."""
    app = FastAPI()
    router_kwargs.setdefault("authorize", allow_all)
    app.include_router(create_sse_router(settings or fast_settings(), **router_kwargs))
    return app


def own_route_app(settings: SSESettings | None = None, events: EventTypes | None = None) -> FastAPI:
    """An endpoint of the app's own: ``add_client`` then ``subscribe`` inside the handler;
    with ``events``, the service validates them and the route documents them."""
    app = FastAPI(lifespan=sse_lifespan(settings or fast_settings(), events=events))
    documented: dict[str, Any] = (
        {"response_class": SSEResponse, "responses": events.openapi_responses()} if events else {}
    )

    @app.get("/events", **documented)
    async def events(request: Request, sse: SSEDep, user: str, last_event_id: str | None = None) -> Any:
        client, response = sse.add_client(request.headers.get("last-event-id") or last_event_id)
        sse.subscribe(client.id, f"user:{user}")
        return response

    return app


@contextmanager
def served(app: FastAPI) -> Iterator[tuple[Served, SSEService]]:
    """Serve ``app`` with uvicorn and hand back its running service."""
    with serve(app) as server:
        yield server, get_sse_from_app(app)
