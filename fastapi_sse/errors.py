"""Exceptions raised by fastapi_sse.

Refusals that concern an HTTP request are also :class:`fastapi.HTTPException`, so a
handler that calls :meth:`SSEService.add_client` answers with a clear status and
message without catching anything.
"""

from __future__ import annotations

from fastapi import HTTPException


class SSEError(Exception):
    """Base class of every error this library raises."""


class SettingsError(SSEError, ValueError):
    """A setting has an invalid value; the message names the environment variable."""


class InvalidEventError(SSEError, ValueError):
    """An event name, id or payload cannot be sent safely (see the message)."""


class LimitExceededError(SSEError, HTTPException):
    """A configured limit refused the request. ``limit`` names the setting."""

    def __init__(self, limit: str, detail: str, status_code: int, retry_after: int | None = None) -> None:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        HTTPException.__init__(self, status_code=status_code, detail=detail, headers=headers)
        self.limit = limit

    def __str__(self) -> str:
        return str(self.detail)


class ServiceNotRunningError(SSEError, RuntimeError):
    """The service was used before it started, or after it shut down."""


class BackendError(SSEError, ConnectionError):
    """The backend could not store or deliver an event (e.g. Redis is unreachable)."""


class BadRequestError(SSEError, HTTPException, ValueError):
    """A request to open a stream is malformed (e.g. an over-long ``Last-Event-ID``)."""

    def __init__(self, detail: str) -> None:
        HTTPException.__init__(self, status_code=400, detail=detail)
        ValueError.__init__(self, detail)

    def __str__(self) -> str:
        return str(self.detail)


class InvalidChannelError(BadRequestError):
    """A channel name is empty, too long or has characters outside the allowed pattern."""


class RunExistsError(SSEError, HTTPException):
    """A run with this id is running, or ended recently and is still retained: run ids
    are never reused while a viewer could still see the old run (HTTP 409)."""

    def __init__(self, run_id: str) -> None:
        detail = f"run {run_id!r} exists (running, or ended and still retained); choose another id"
        HTTPException.__init__(self, status_code=409, detail=detail)

    def __str__(self) -> str:
        return str(self.detail)


class RunNotFoundError(SSEError, HTTPException):
    """No run has this id, or it ended longer ago than its retention (HTTP 404)."""

    def __init__(self, run_id: str) -> None:
        HTTPException.__init__(self, status_code=404, detail=f"no run {run_id!r} (never started, or forgotten)")

    def __str__(self) -> str:
        return str(self.detail)


class RunCancelled(SSEError):
    """Raised in a run's producer at its next ``send`` once the run was cancelled."""


__all__ = [
    "BackendError",
    "BadRequestError",
    "InvalidChannelError",
    "InvalidEventError",
    "LimitExceededError",
    "RunCancelled",
    "RunExistsError",
    "RunNotFoundError",
    "SSEError",
    "ServiceNotRunningError",
    "SettingsError",
]
