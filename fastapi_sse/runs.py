"""Runs: one producer's stream of events (an LLM's tokens, a job's progress) that any
number of viewers follow, from its start or from where they left, to its end.

A producer opens a run (``sse.runs.open()``, :meth:`Runs.open`) and sends events to it; viewers
open its stream (:meth:`Runs.stream`, or the router's run route) on any
worker. Viewers coming and going never touch the producer. Every run ends with one
terminal event, ``end``, whose data says how it ended::

    {"status": "done", "result": ...}        finish()
    {"status": "failed", "error": "..."}     fail(), or the producer raised
    {"status": "cancelled"}                  sse.runs.cancel() from anywhere
    {"status": "lost"}                       the producer's process died (its lease lapsed)

After ``end`` the viewer's stream closes; a viewer that reconnects after it is told
``204 No Content``, which makes a browser's EventSource stop reconnecting.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, Protocol

from fastapi_sse.errors import RunCancelled


class RunHost(Protocol):
    """What a run needs from its service (``fastapi_sse._runs.Runs``)."""

    async def send(self, run: Run, event: str, data: Any, event_id: str | None) -> str: ...

    async def end(self, run: Run, outcome: dict[str, Any]) -> None: ...


class Run:
    """The producer's side of a run, as :meth:`Runs.open` returns it.

    Use it as an async context manager: leaving the block finishes the run (with
    ``finish()``), an exception fails it, and a cancel ends it as ``cancelled``::

        async with await sse.runs.open() as run:
            async for token in model.generate(prompt):
                await run.send("token", token)
    """

    def __init__(self, run_id: str, host: RunHost) -> None:
        self.id = run_id
        self._host = host
        self._cancelled = False
        self._ended = False

    def __repr__(self) -> str:
        return f"Run(id={self.id!r}, cancelled={self._cancelled}, ended={self._ended})"

    @property
    def cancelled(self) -> bool:
        """Whether someone asked the run to stop (:meth:`Runs.cancel`)."""
        return self._cancelled

    @property
    def ended(self) -> bool:
        return self._ended

    def mark_cancelled(self) -> None:
        """Called by the service when a cancel reaches this run."""
        self._cancelled = True

    async def send(self, event: str, data: Any, id: str | None = None) -> str:
        """Add an event to the run and return its id once it is stored (viewers that
        come later replay it). Raises :class:`RunCancelled` once the run was cancelled,
        so that a producer stops at its next event."""
        if self._ended:
            raise RuntimeError(f"run {self.id!r} has ended")
        if self._cancelled:
            raise RunCancelled(f"run {self.id!r} was cancelled")
        return await self._host.send(self, event, data, id)

    async def finish(self, result: Any = None) -> None:
        """End the run: viewers get ``end`` with ``{"status": "done", "result": result}``."""
        await self._end({"status": "done", "result": result})

    async def fail(self, error: Any) -> None:
        """End the run as failed: ``end`` with ``{"status": "failed", "error": str(error)}``."""
        await self._end({"status": "failed", "error": str(error)})

    async def _end(self, outcome: dict[str, Any]) -> None:
        if self._ended:
            return
        self._ended = True
        await self._host.end(self, outcome)

    async def __aenter__(self) -> Run:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if self._ended:
            return isinstance(error, RunCancelled)
        if error is None:
            await self.finish()
            return False
        if isinstance(error, RunCancelled | asyncio.CancelledError):
            await self._end({"status": "cancelled"})
            return isinstance(error, RunCancelled)  # the producer stopped as asked
        await self.fail(error)
        return False


__all__ = ["Run"]
