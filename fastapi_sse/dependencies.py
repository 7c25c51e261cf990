"""How handlers reach the service: the lifespan that runs it and ``Depends(get_sse)``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request

from fastapi_sse.errors import ServiceNotRunningError
from fastapi_sse.service import SSEService
from fastapi_sse.settings import SSESettings, load_settings
from fastapi_sse.startup_checks import check_startup

STATE_KEY = "sse"


def sse_lifespan(
    settings: SSESettings | None = None,
    *,
    service: SSEService | None = None,
) -> Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]:
    """A lifespan that starts an :class:`SSEService` and ends it at shutdown.

    Pass it as ``FastAPI(lifespan=sse_lifespan())``, or let :func:`create_sse_router`
    attach it to the router (FastAPI merges it with the app's own lifespan). The
    settings are read from the environment when the app starts, unless given.
    The service is in ``app.state.sse`` and the lifespan state, for
    ``Depends(get_sse)`` and for code outside requests (background jobs).
    """

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        sse = service if service is not None else SSEService(settings if settings is not None else load_settings())
        check_startup(sse, from_environment=service is None and settings is None)
        await sse.start()
        sse.install_signal_handlers()
        state = getattr(app, "state", None)
        if state is not None:
            setattr(state, STATE_KEY, sse)
        try:
            yield {STATE_KEY: sse}
        finally:
            await sse.aclose()
            if state is not None and getattr(state, STATE_KEY, None) is sse:
                delattr(state, STATE_KEY)

    return lifespan


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
