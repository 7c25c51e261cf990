"""The router factory: the subscribe endpoint and the admin connection stats."""

from collections.abc import Callable, Collection, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, params
from fastapi.responses import JSONResponse

from fastapi_sse import middleware
from fastapi_sse.client import SSEClient
from fastapi_sse.dependencies import SSEDep, sse_lifespan
from fastapi_sse.errors import LimitExceededError
from fastapi_sse.hooks import Authorize, Bound, DefaultChannels, Identify, OnConnect, as_value_dependency, dependency
from fastapi_sse.response import SSEResponse
from fastapi_sse.service import SSEService
from fastapi_sse.settings import SSESettings
from fastapi_sse.stats import ConnectionStats
from fastapi_sse.typed import EventTypes

_LAST_EVENT_ID_HEADER: dict[str, Any] = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "description": "Sent by EventSource on every reconnect: the stream replays what came after this id.",
    "schema": {"type": "string"},
}

_STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "An endless `text/event-stream`: a `retry:` hint, then events as "
        "`id:`/`event:`/`data:` frames and `: ping` comments while idle.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    400: {"description": "A channel name or the Last-Event-ID is malformed, or too many channels."},
    403: {"description": "The app's authorization refused one of the channels."},
    429: {
        "description": "With hard_refusals only: this identity has too many open streams "
        "(identity_limit_policy=refuse). By default the answer is a 200 stream that sets `retry:` and ends."
    },
    503: {
        "description": "With hard_refusals only: the server is at max_connections, or shutting down. "
        "By default the answer is a 200 stream that sets `retry:` and ends."
    },
}


def _stream_doc(events: EventTypes | None) -> dict[int | str, dict[str, Any]]:
    """The subscribe route's responses; with typed events, the 200 lists them."""
    if events is None or not len(events):
        return _STREAM_DOC
    return {**_STREAM_DOC, **events.openapi_responses(description=_STREAM_DOC[200]["description"])}


async def _no_value() -> None:
    return None


async def _no_hook() -> None:
    return None


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
    runs_path: str | None = "/runs/{run_id}",
    service: SSEService | None = None,
    events: EventTypes | None = None,
    asyncapi_path: str | None = "/asyncapi.json",
    asyncapi_dependencies: Sequence[params.Depends] | None = None,
) -> APIRouter:
    """A router with the subscribe endpoint and, when protected, the admin stats.

    ``GET {subscribe_path}?channel=a&channel=b`` opens a stream on those channels.
    ``authorize`` decides each requested channel (identity comes from your auth, not
    from the query); ``default_channels`` are always subscribed (e.g. ``user:{id}``)
    and need no authorization; ``identify`` names the identity for
    ``max_connections_per_identity``; ``on_connect`` may send the initial state with
    ``sse.send_to(client.id, ...)``. Each hook is resolved by FastAPI's dependency
    injection, so it may ``Depends`` on the app's own auth (see :mod:`fastapi_sse.hooks`):
    ``identify=current_user_id``, ``authorize=can_read`` with
    ``def can_read(channel: str, user: Annotated[User, Depends(current_user)])``. The
    plain forms ``authorize(request, channel)``, ``identify(request)``,
    ``default_channels(request)`` and ``on_connect(request, client, sse)`` work too.

    ``GET {admin_path}`` exists only when ``admin_dependencies`` is given: the
    dependencies that protect it (e.g. a token check). ``Depends(allow_anyone)``
    style opening must be explicit.

    ``GET {metrics_path}`` (Prometheus text format, route ``fastapi_sse:metrics``)
    likewise exists only when ``metrics_dependencies`` is given; it needs the
    ``metrics`` extra (prometheus-client).

    ``events`` (an :class:`EventTypes`) declares the typed events: every publish of
    one is validated against its model, the subscribe route's OpenAPI response lists
    them with their schemas, and ``GET {asyncapi_path}`` (route ``fastapi_sse:asyncapi``)
    serves their AsyncAPI 3 document, titled with the app's title and version. Like
    ``/openapi.json`` it is open by default; ``asyncapi_dependencies`` protect it, and
    ``asyncapi_path=None`` leaves it out. Declare the events before building the router.

    ``GET {runs_path}`` streams a run to a viewer (see :mod:`fastapi_sse.runs`) and
    ``POST {runs_path}/cancel`` asks it to stop; ``authorize`` decides both, with the
    channel ``run:<run_id>``. ``runs_path=None`` mounts neither.

    The router carries the service's lifespan: ``app.include_router(router)`` is all
    it takes. Route names are namespaced (``fastapi_sse:subscribe``).
    """
    router = APIRouter(lifespan=sse_lifespan(settings, service=service, events=events))
    authorize_dep = dependency(authorize, legacy=("request", "channel"), provided={"channel": str})
    identify_dep = as_value_dependency(identify, legacy=("request",)) if identify else _no_value
    defaults_dep = as_value_dependency(default_channels, legacy=("request",)) if default_channels else _no_value
    connect_dep: Callable[..., Any] = (
        dependency(on_connect, legacy=("request", "client", "sse"), provided={"client": SSEClient, "sse": SSEService})
        if on_connect
        else _no_hook
    )

    @router.get(
        subscribe_path,
        name="fastapi_sse:subscribe",
        operation_id="sse_subscribe",
        response_class=SSEResponse,
        responses=_stream_doc(events),
        summary="Open an event stream",
        openapi_extra={"parameters": [_LAST_EVENT_ID_HEADER]},
    )
    async def subscribe(
        request: Request,
        sse: SSEDep,
        can_read: Annotated[Bound, Depends(authorize_dep)],
        identity: Annotated[str | None, Depends(identify_dep)],
        defaults: Annotated[Collection[str] | None, Depends(defaults_dep)],
        connected: Annotated[Bound | None, Depends(connect_dep)],
        channel: Annotated[list[str], Query(description="Channel to subscribe to; repeat for several.")] = [],  # noqa: B006 - FastAPI copies defaults
        last_event_id: Annotated[
            str | None,
            Query(description="Resume after this event id, on a first connection (the Last-Event-ID header wins)."),
        ] = None,
        presence: Annotated[
            bool, Query(description="Also receive `presence` events: who joins and leaves these channels.")
        ] = False,
    ) -> SSEResponse:
        requested = list(dict.fromkeys(channel))
        for name in requested:
            sse.check_channel(name)
        default_names = list(defaults) if defaults else []
        for name in default_names:
            sse.check_channel(name)
        wanted = list(dict.fromkeys([*default_names, *requested]))
        limit = sse.settings.max_channels_per_connection
        if len(wanted) > limit:
            raise LimitExceededError(
                "max_channels_per_connection",
                f"{len(wanted)} channels requested, at most {limit} allowed (max_channels_per_connection)",
                400,
            )
        for name in requested:
            if name not in default_names and not await can_read(channel=name):
                raise HTTPException(403, f"not allowed to subscribe to channel {name!r}")
        resume = middleware.last_event_id(request.scope) or ""
        client, response = sse.add_client(resume, identity=identity)
        if client.closed:
            return response  # refused for load, a limit or shutdown: told when to come back
        try:
            for name in wanted:
                sse.subscribe(client.id, name)
                if presence:
                    sse.presence.watch(client.id, name)
            if connected is not None:
                await connected(client=client, sse=sse)
        except BaseException:
            # The response will never run: free the client's slot now.
            sse.remove_unstarted(client)
            raise
        return response

    if events is not None and asyncapi_path is not None:
        registry = events

        @router.get(
            asyncapi_path,
            name="fastapi_sse:asyncapi",
            operation_id="sse_asyncapi",
            dependencies=list(asyncapi_dependencies or ()),
            response_class=JSONResponse,
            responses={200: {"description": "An AsyncAPI 3.0.0 document.", "content": {"application/json": {}}}},
            summary="AsyncAPI document of the event stream",
        )
        async def asyncapi(request: Request) -> JSONResponse:
            app = request.app
            return JSONResponse(
                registry.asyncapi(
                    title=app.title,
                    version=app.version,
                    description=app.description or None,
                    subscribe_path=app.url_path_for("fastapi_sse:subscribe"),
                )
            )

    if runs_path is not None:
        _mount_runs(router, runs_path, authorize_dep)

    if admin_dependencies is not None:

        @router.get(
            admin_path,
            name="fastapi_sse:connections",
            operation_id="sse_connections",
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
            operation_id="sse_metrics",
            dependencies=list(metrics_dependencies),
            response_class=Response,
            responses={200: {"description": "Prometheus text format.", "content": {"text/plain": {}}}},
            summary="Prometheus metrics",
        )
        async def metrics(sse: SSEDep) -> Response:
            return metrics_response(sse)

    return router


__all__ = ["allow_all", "create_sse_router"]


_RUN_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The run's `text/event-stream`: its events from the start (or after Last-Event-ID), "
        "live ones, then the terminal `end` event, and the stream ends.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    204: {"description": "The viewer has seen the whole ended run: an EventSource stops reconnecting."},
    403: {"description": "The app's authorization refused the run (channel `run:<run_id>`)."},
    404: {"description": "No such run, or it ended longer ago than run_retention."},
}


def _mount_runs(router: APIRouter, path: str, authorize_dep: Callable[..., Any]) -> None:
    async def allowed(can_read: Bound, run_id: str) -> None:
        if not await can_read(channel=f"run:{run_id}"):
            raise HTTPException(403, f"not allowed to view run {run_id!r}")

    @router.get(
        path,
        name="fastapi_sse:run",
        operation_id="sse_run",
        response_class=SSEResponse,
        responses=_RUN_DOC,
        summary="Follow a run's events",
        openapi_extra={"parameters": [_LAST_EVENT_ID_HEADER]},
    )
    async def view_run(run_id: str, sse: SSEDep, can_read: Annotated[Bound, Depends(authorize_dep)]) -> Response:
        await allowed(can_read, run_id)
        return await sse.runs.stream(run_id)

    @router.post(
        path + "/cancel",
        name="fastapi_sse:cancel_run",
        operation_id="sse_cancel_run",
        status_code=202,
        responses={404: {"description": "No such run, or it has ended."}},
        summary="Ask a run to stop",
    )
    async def cancel_run(
        run_id: str, sse: SSEDep, can_read: Annotated[Bound, Depends(authorize_dep)]
    ) -> dict[str, str]:
        await allowed(can_read, run_id)
        if not await sse.runs.cancel(run_id):
            raise HTTPException(404, f"no running run {run_id!r}")
        return {"run_id": run_id, "status": "cancelling"}
