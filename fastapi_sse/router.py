"""The router factory: the subscribe endpoint and the admin connection stats."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Annotated, Any, TypeAlias, TypeVar

from fastapi import APIRouter, HTTPException, Query, Request, Response, params

from fastapi_sse.client import DisconnectReason, SSEClient
from fastapi_sse.dependencies import SSEDep, sse_lifespan
from fastapi_sse.errors import LimitExceededError
from fastapi_sse.response import SSEResponse
from fastapi_sse.service import SSEService
from fastapi_sse.settings import SSESettings
from fastapi_sse.stats import ConnectionStats

T = TypeVar("T")
MaybeAwaitable: TypeAlias = T | Awaitable[T]

Authorize = Callable[[Request, str], MaybeAwaitable[bool]]
Identify = Callable[[Request], MaybeAwaitable[str | None]]
DefaultChannels = Callable[[Request], MaybeAwaitable[Collection[str]]]
OnConnect = Callable[[Request, SSEClient, SSEService], MaybeAwaitable[None]]

_STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "An endless `text/event-stream`: a `retry:` hint, then events as "
        "`id:`/`event:`/`data:` frames and `: ping` comments while idle.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    400: {"description": "A channel name or the Last-Event-ID is malformed, or too many channels."},
    403: {"description": "The app's authorization refused one of the channels."},
    429: {"description": "This identity has too many open streams (identity_limit_policy=refuse)."},
    503: {"description": "The server is at max_connections, or shutting down."},
}


async def _call(value: MaybeAwaitable[T]) -> T:
    if inspect.isawaitable(value):
        result: T = await value
        return result
    return value


def _header_text(value: str | None) -> str | None:
    """A header as the client meant it: browsers send ``Last-Event-ID`` as UTF-8,
    which Starlette decodes as Latin-1."""
    if value is None or value.isascii():
        return value
    try:
        return value.encode("latin-1").decode()
    except UnicodeError:
        return value


def allow_all(request: Request, channel: str) -> bool:
    """An ``authorize`` hook for apps whose channels are all public."""
    return True


def create_sse_router(
    settings: SSESettings | None = None,
    *,
    authorize: Authorize,
    identify: Identify | None = None,
    default_channels: DefaultChannels | None = None,
    on_connect: OnConnect | None = None,
    subscribe_path: str = "/subscribe",
    admin_dependencies: Sequence[params.Depends] | None = None,
    admin_path: str = "/admin/connections",
    metrics_dependencies: Sequence[params.Depends] | None = None,
    metrics_path: str = "/metrics",
    service: SSEService | None = None,
) -> APIRouter:
    """A router with the subscribe endpoint and, when protected, the admin stats.

    ``GET {subscribe_path}?channel=a&channel=b`` opens a stream on those channels.
    ``authorize(request, channel)`` decides each requested channel (identity comes
    from your auth, not from the query); ``default_channels(request)`` are always
    subscribed (e.g. ``user:{id}``) and need no authorization; ``identify(request)``
    names the identity for ``max_connections_per_identity``; ``on_connect`` may send
    the initial state with ``sse.send_to(client.id, ...)``.

    ``GET {admin_path}`` exists only when ``admin_dependencies`` is given: the
    dependencies that protect it (e.g. a token check). ``Depends(allow_anyone)``
    style opening must be explicit.

    ``GET {metrics_path}`` (Prometheus text format, route ``fastapi_sse:metrics``)
    likewise exists only when ``metrics_dependencies`` is given; it needs the
    ``metrics`` extra (prometheus-client).

    The router carries the service's lifespan: ``app.include_router(router)`` is all
    it takes. Route names are namespaced (``fastapi_sse:subscribe``).
    """
    router = APIRouter(lifespan=sse_lifespan(settings, service=service))

    @router.get(
        subscribe_path,
        name="fastapi_sse:subscribe",
        response_class=SSEResponse,
        # Stated, because FastAPI reads the default status from the response class's
        # __init__, and SSEResponse's takes the client and service instead.
        status_code=200,
        responses=_STREAM_DOC,
        summary="Open an event stream",
    )
    async def subscribe(
        request: Request,
        sse: SSEDep,
        channel: Annotated[list[str], Query(description="Channel to subscribe to; repeat for several.")] = [],  # noqa: B006 - FastAPI copies defaults
        last_event_id: Annotated[
            str | None,
            Query(description="Resume after this event id (the Last-Event-ID header wins)."),
        ] = None,
    ) -> SSEResponse:
        requested = list(dict.fromkeys(channel))
        for name in requested:
            sse.check_channel(name)
        defaults: list[str] = list(await _call(default_channels(request))) if default_channels else []
        for name in defaults:
            sse.check_channel(name)
        wanted = list(dict.fromkeys([*defaults, *requested]))
        limit = sse.settings.max_channels_per_connection
        if len(wanted) > limit:
            raise LimitExceededError(
                "max_channels_per_connection",
                f"{len(wanted)} channels requested, at most {limit} allowed (max_channels_per_connection)",
                400,
            )
        for name in requested:
            if name not in defaults and not await _call(authorize(request, name)):
                raise HTTPException(403, f"not allowed to subscribe to channel {name!r}")
        identity = await _call(identify(request)) if identify else None
        resume = _header_text(request.headers.get("last-event-id")) or last_event_id
        client, response = sse.add_client(resume, identity=identity)
        try:
            if identity is not None:
                await sse.enforce_identity_limit(client)
            for name in wanted:
                sse.subscribe(client.id, name)
            if on_connect is not None:
                result = on_connect(request, client, sse)
                if inspect.isawaitable(result):
                    await result
        except BaseException:
            # The response will never run: free the client's slot now, not at attach_timeout.
            sse._detach(client, DisconnectReason.NEVER_STARTED)
            raise
        return response

    if admin_dependencies is not None:

        @router.get(
            admin_path,
            name="fastapi_sse:connections",
            dependencies=list(admin_dependencies),
            response_model=ConnectionStats,
            summary="Connection statistics",
        )
        async def connections(sse: SSEDep) -> ConnectionStats:
            return await sse.cluster_stats()

    if metrics_dependencies is not None:
        # Imported here: prometheus-client is an optional extra, needed only by this route.
        from fastapi_sse.metrics import metrics_response

        @router.get(
            metrics_path,
            name="fastapi_sse:metrics",
            dependencies=list(metrics_dependencies),
            response_class=Response,
            responses={200: {"description": "Prometheus text format.", "content": {"text/plain": {}}}},
            summary="Prometheus metrics",
        )
        async def metrics(sse: SSEDep) -> Response:
            return metrics_response(sse)

    return router
