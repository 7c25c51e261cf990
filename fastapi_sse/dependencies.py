"""How handlers reach the service: the lifespan that runs it and ``Depends(get_sse)``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request

from fastapi_sse import middleware
from fastapi_sse.errors import ServiceNotRunningError
from fastapi_sse.service import SSEService
from fastapi_sse.settings import SSESettings, load_settings
from fastapi_sse.startup_checks import check_startup
from fastapi_sse.typed import EventTypes, refuse_other_events

STATE_KEY = "sse"


def sse_lifespan(
    settings: SSESettings | None = None,
    *,
    service: SSEService | None = None,
    events: EventTypes | None = None,
) -> Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]:
    """A lifespan that starts an :class:`SSEService` and ends it at shutdown.

    Pass it as ``FastAPI(lifespan=sse_lifespan())``, or let :func:`create_sse_router`
    attach it to the router (FastAPI merges it with the app's own lifespan). The
    settings are read from the environment when the app starts, unless given.
    The service is in ``app.state.sse`` and the lifespan state, for
    ``Depends(get_sse)`` and for code outside requests (background jobs).

    One app has one service: when both setups are used (``lifespan=sse_lifespan()``
    and ``include_router(create_sse_router(...))``), the second one uses the service
    the first started, and refuses to start with settings or a service of its own
    that differ from it. The lifespan also wraps the app in :class:`SSEMiddleware`
    (unless the app added it itself), which gives ``add_client`` the request's
    ``Last-Event-ID``, releases streams a handler opened and never returned, and runs
    open streams outside their route.

    ``events`` (an :class:`EventTypes`) gives the service the typed events whose data
    every publish validates; with both setups, both must name the same registry.
    """

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        state = getattr(app, "state", None)
        running = getattr(state, STATE_KEY, None) if state is not None else None
        if isinstance(running, SSEService) and running.running:
            _check_same_service(running, settings, service, events)
            yield {STATE_KEY: running}
            return
        if service is not None:
            _check_same_events(service, events)
            sse = service
        else:
            sse = SSEService(settings if settings is not None else load_settings(), events=events)
        check_startup(sse, from_environment=service is None and settings is None)
        await sse.start()
        sse.install_signal_handlers()
        uninstall = middleware.install(app, hand_off=sse.settings.stream_outside_route)
        if state is not None:
            setattr(state, STATE_KEY, sse)
        try:
            yield {STATE_KEY: sse}
        finally:
            if uninstall is not None:
                uninstall()
            await sse.aclose()
            if state is not None and getattr(state, STATE_KEY, None) is sse:
                delattr(state, STATE_KEY)

    return lifespan


def _check_same_service(
    running: SSEService, settings: SSESettings | None, service: SSEService | None, events: EventTypes | None
) -> None:
    """A second SSE lifespan of one app may only mean the service already running."""
    if service is not None and service is not running:
        problem = "another SSEService was passed"
    elif settings is not None and settings != running.settings:
        problem = "it was given settings that differ from the running service's"
    else:
        return _check_same_events(running, events)
    raise RuntimeError(
        "this app already runs an SSE service, and a second SSE lifespan would start another one "
        f"({problem}): events published through one would never reach the streams of the other. "
        "Keep one setup: either FastAPI(lifespan=sse_lifespan(...)) or "
        "app.include_router(create_sse_router(...)) with the settings there; or give both the same "
        "service (create_sse_router(service=sse), sse_lifespan(service=sse))"
    )


def _check_same_events(running: SSEService, events: EventTypes | None) -> None:
    """The router and the lifespan of one app (or a service and its lifespan) name one registry."""
    if (problem := refuse_other_events(events, running.events)) is not None:
        raise RuntimeError(
            f"this app's SSE service and another SSE setup name different typed events ({problem}): "
            "the events of one would not be validated by the service of the other. Give the router and "
            "the lifespan the same registry (create_sse_router(events=events), sse_lifespan(events=events)), "
            "or name it only in FastAPI(lifespan=sse_lifespan(events=events)), which starts the service"
        )


async def get_sse(request: Request) -> SSEService:
    """The ``Depends()`` provider of the running :class:`SSEService`.

    A coroutine, so FastAPI calls it on the event loop (it would run a plain
    function in its threadpool, a thread hop for every request)."""
    service = getattr(request.state, STATE_KEY, None)
    if service is None:
        service = getattr(request.app.state, STATE_KEY, None)
    if not isinstance(service, SSEService):
        raise ServiceNotRunningError(
            "no SSE service is running for this app: include the router from "
            "create_sse_router(...) with app.include_router(...), or create the app with "
            "FastAPI(lifespan=sse_lifespan())"
        )
    return service


def get_sse_from_app(app: FastAPI) -> SSEService:
    """The running service of ``app``, for code outside a request (jobs, threads)."""
    service = getattr(app.state, STATE_KEY, None)
    if not isinstance(service, SSEService):
        raise ServiceNotRunningError(
            "the app has no running SSE service yet: it starts with the app's lifespan "
            "(include the router from create_sse_router(...) or use lifespan=sse_lifespan())"
        )
    return service


SSEDep = Annotated[SSEService, Depends(get_sse)]
"""Annotate a handler parameter with this to receive the service: ``sse: SSEDep``."""


__all__ = ["SSEDep", "get_sse", "get_sse_from_app", "sse_lifespan"]
