"""The service's side of runs (see :mod:`fastapi_sse.runs`).

A run is the internal channel ``$run:<id>``: its events are stored in that channel's
history (up to ``run_history_size``, so a viewer replays the whole run) and reach
viewers like any channel's. What the history cannot say lives in the backend's
:class:`~fastapi_sse.backends.base.RunLedger`: who produces the run (a lease its
producer renews), whether it ended, whether it was asked to stop. One task per worker
renews the leases of the runs produced here (and brings their cancels), and checks
the runs watched here: one whose lease lapsed without an end (its producer's process
died) is ended for it, as ``lost``, by whichever worker claims the end first.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterable, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from starlette.responses import Response

from fastapi_sse import _positions, middleware
from fastapi_sse._admission import Admission
from fastapi_sse._names import RUN_END_EVENT, RUN_END_PREFIX, run_channel, run_of
from fastapi_sse._publishing import Publisher
from fastapi_sse._registry import Registry
from fastapi_sse.backends.base import Backend, Publication, RunLedger
from fastapi_sse.client import SSEClient
from fastapi_sse.errors import BackendError, BadRequestError, RunExistsError, RunNotFoundError
from fastapi_sse.response import SSEResponse
from fastapi_sse.runs import Run
from fastapi_sse.settings import SSESettings

logger = logging.getLogger("fastapi_sse")

_T = TypeVar("_T")

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


class Runs:
    """The runs of a service, as ``sse.runs``: open one (:meth:`open`), stream it to a
    viewer (:meth:`stream`), cancel it (:meth:`cancel`). See :mod:`fastapi_sse.runs`."""

    def __init__(
        self,
        settings: SSESettings,
        admission: Admission,
        publisher: Publisher,
        backend: Backend,
        ledger: RunLedger,
        registry: Registry,
        *,
        worker_id: str,
        open_client: Callable[[], tuple[SSEClient, SSEResponse]],
        view: Callable[..., None],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self._open_client = open_client
        self._view = view
        self._spawn = spawn
        self.settings = settings
        self.admission = admission
        self.publisher = publisher
        self.backend = backend
        self.ledger = ledger
        self.registry = registry
        self.worker_id = worker_id
        self.produced: dict[str, Run] = {}
        # Runs of one request (serve() without a run id): kept only briefly after their end.
        self.private: set[str] = set()

    def check_id(self, run_id: str) -> str:
        if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
            raise BadRequestError(
                f"run id {run_id!r} is not valid: 1 to 128 letters, digits and _.:- starting with a letter or digit"
            )
        return run_id

    # -- the producer's side ----------------------------------------------------------------

    async def open(self, run_id: str | None = None) -> Run:
        """Start a run and return its producer's handle (:class:`Run`). ``run_id``
        defaults to a new random one; one in use or still retained raises
        :class:`RunExistsError` (409): an id never shows a stale run."""
        run_id = self.check_id(run_id) if run_id is not None else uuid.uuid4().hex
        settings = self.settings
        first = (await self.backend.heads([run_channel(run_id)]))[run_channel(run_id)]
        if not await self.ledger.begin(
            run_id, self.worker_id, first=first, lease=settings.run_lease, retain=settings.run_retention
        ):
            raise RunExistsError(run_id)
        run = self.produced[run_id] = Run(run_id, self)
        return run

    async def send(self, run: Run, event: str, data: Any, event_id: str | None) -> str:
        payload = self.admission.encode(event, data, event_id)
        if payload.startswith(RUN_END_PREFIX):
            raise BadRequestError(f"event name {RUN_END_EVENT!r} is a run's terminal event: end the run instead")
        return await self._publish(run.id, payload, event_id)

    async def end(self, run: Run, outcome: dict[str, Any]) -> None:
        self.produced.pop(run.id, None)
        await self._end(run.id, outcome)

    async def _end(self, run_id: str, outcome: dict[str, Any]) -> None:
        """Publish the terminal event, once: by the first to claim the run's end."""
        private = run_id in self.private
        self.private.discard(run_id)
        retain = self.settings.run_lease if private else self.settings.run_retention
        if await self._patiently(lambda: self.ledger.end(run_id, retain=retain)):
            await self._publish(run_id, self.admission.encode(RUN_END_EVENT, outcome, None), None)

    async def _publish(self, run_id: str, payload: bytes, event_id: str | None) -> str:
        history = self.settings.run_history_size
        publication = Publication(run_channel(run_id), payload, event_id, True, history=history)
        messages = await self._patiently(lambda: self.publisher.publish_many([publication]))
        return messages[0].id

    async def _patiently(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """``call()``, again while the backend is unreachable, for up to ``run_lease``
        seconds (a restart of Redis): a run outlives a short outage, and past its lease
        its viewers end it anyway. A batch sent again is stored once (its keys)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.run_lease
        delay = 0.05
        while True:
            try:
                return await call()
            except BackendError:
                if loop.time() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def cancel(self, run_id: str) -> bool:
        """Ask a run to stop, from any worker: its producer's next ``send`` raises
        :class:`RunCancelled` within ``run_poll_interval``. False when the run is
        unknown or has ended."""
        self.check_id(run_id)
        local = self.produced.get(run_id)
        if local is not None:
            local.mark_cancelled()
        return await self.ledger.cancel(run_id) or local is not None

    # -- the viewers' side --------------------------------------------------------------------

    async def stream(self, run_id: str, last_event_id: str | None = None) -> Response:
        """The response that streams a run to a viewer; return it from a handler. From
        ``last_event_id`` (by default the request's ``Last-Event-ID``, as for
        ``add_client``), else from the run's start, to its ``end``; ``204 No Content``
        for a viewer that has seen the whole ended run (its EventSource then stops).
        Raises :class:`RunNotFoundError` (404) for an unknown run."""
        return await self._stream(run_id, last_event_id)

    async def _stream(
        self, run_id: str, last_event_id: str | None, on_detach: Callable[[], None] | None = None
    ) -> Response:
        cursor = last_event_id if last_event_id is not None else middleware.current_last_event_id()
        cursor = self.admission.cursor(cursor)
        first = await self.seen_to_the_end(run_id, cursor)
        if first is None:
            return Response(status_code=204)
        client, response = self._open_client()
        if not client.closed:
            self._view(client, run_id, cursor, first, on_detach)
        elif on_detach is not None:
            on_detach()
        return response

    async def serve(self, events: AsyncIterable[Any], *, run_id: str | None = None) -> Response:
        """The response that streams what an async generator yields, for a route to
        return: each item is ``(event, data)``, ``(event, data, id)``, or data alone
        (event ``message``). Heartbeats, the retry hint, limits and the disconnect are
        the service's, as for any stream.

        Without ``run_id`` the generator belongs to the request: it stops (is closed)
        when the client goes away. With ``run_id`` it is a run: the first request
        starts it and it runs to its end whoever watches; a request that comes back
        with the same id (a reconnect with ``Last-Event-ID``, a reload) follows the run
        from where it left, and the generator runs once."""
        if run_id is not None:
            try:
                run = await self.open(run_id)
            except RunExistsError:
                return await self._stream(run_id, None)
            self._spawn(self._pump(run, events))
            return await self._stream(run.id, None)
        run = await self.open(None)
        task = asyncio.get_running_loop().create_task(self._pump(run, events))
        self.private.add(run.id)
        # The client went away (or the stream ended): stop the generator.
        return await self._stream(run.id, "", lambda: _cancel(task))

    async def _pump(self, run: Run, events: AsyncIterable[Any]) -> None:
        async with run:
            async for item in events:
                if isinstance(item, tuple) and len(item) in (2, 3) and isinstance(item[0], str):
                    await run.send(*item)
                else:
                    await run.send("message", item)

    async def seen_to_the_end(self, run_id: str, cursor: str | None) -> int | None:
        """None when a viewer resuming from ``cursor`` has everything of an ended run,
        else the sequence number the run's events come after; raises
        :class:`RunNotFoundError` for an unknown run."""
        state = await self.ledger.state(self.check_id(run_id))
        if state is None:
            raise RunNotFoundError(run_id)
        if not state.ended or not cursor:
            return state.first
        channel = run_channel(run_id)
        cursors = await _positions.cursors_of(self.backend, cursor, [channel])
        if cursors is not None and not (await self.backend.replay([channel], cursors[channel])).messages:
            return None
        return state.first

    # -- the worker's task --------------------------------------------------------------------

    async def watch(self) -> None:
        """Renew the leases of runs produced here (their cancels come back with it), and
        end the runs watched here whose producer died."""
        while True:
            await asyncio.sleep(self.settings.run_poll_interval)
            try:
                await self._renew()
                await self._check_watched()
            except Exception as exc:
                logger.warning("could not renew or check runs: %s", exc)

    async def _renew(self) -> None:
        for run in list(self.produced.values()):
            state = await self.ledger.renew(run.id, self.worker_id, lease=self.settings.run_lease)
            if state is None or state.cancelled or state.ended:
                # Cancelled, or the ledger lost it (its end was claimed for it): stop.
                run.mark_cancelled()

    async def _check_watched(self) -> None:
        watched = {run_id for channel in list(self.registry.channels) if (run_id := run_of(channel)) is not None}
        for run_id in watched - set(self.produced):
            state = await self.ledger.state(run_id)
            if state is None or not (state.live or state.ended):
                logger.warning("run %s lost its producer (its lease lapsed); ending it for its viewers", run_id)
                await self._end(run_id, {"status": "lost"})


def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
