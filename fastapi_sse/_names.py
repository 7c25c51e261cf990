"""Reserved channels and the naming of clients, shared by the service, the backends
and the metrics.

A client id is ``<worker id>.<32 hex digits>``: the worker that holds the client is
readable from it, which is how an event for one client (on its channel
``$client:<client id>``) reaches that worker, and how a shared store drops the
members of a worker that stopped from a capped group.
"""

from __future__ import annotations

import re
import uuid

INTERNAL_PREFIX = "$"
"""Channels starting with it are the service's own; a valid channel name never does."""

ALL_CHANNEL = "$all"
"""Internal channel every client listens to; :meth:`SSEService.broadcast_all` uses it."""

CLIENT_CHANNEL_PREFIX = "$client:"
"""Internal per-client channel; :meth:`SSEService.send_to` uses it."""

IDENTITY_CHANNEL_PREFIX = "$identity:"
"""Pseudo channel of an identity: the id of an event sent to one of its clients
resolves through it when a client of that identity resumes (nothing is published on it)."""

IDENTITY_GROUP_PREFIX = "identity:"
"""Capped group (:meth:`Coordination.claim`) of an identity's streams across workers."""

PRESENCE_CHANNEL_PREFIX = "$presence:"
"""Internal channel of a channel's presence: who joins and leaves it."""

PRESENCE_EVENT = "presence"
"""Name of the event that says an identity joined or left a channel."""

RUN_CHANNEL_PREFIX = "$run:"
"""Internal channel of a run: its events, in its history, for every viewer."""

RUN_END_EVENT = "end"
"""Name of a run's terminal event: ``{"status": "done" | "failed" | "cancelled" | "lost", ...}``."""

GAP_EVENT = "gap"
"""Name of the event a resuming client gets when history no longer covers its cursor."""

CLOSE = b""
"""Sent on a client's channel to make the worker holding it close it (a real event's
payload is never empty)."""

_CLIENT_ID = re.compile(r"[0-9a-f]{12}\.[0-9a-f]{32}")


def new_worker_id() -> str:
    return uuid.uuid4().hex[:12]


def new_client_id(worker_id: str) -> str:
    return f"{worker_id}.{uuid.uuid4().hex}"


def is_client_id(text: str) -> bool:
    """Whether ``text`` has the form of a client id, of this worker or another."""
    return _CLIENT_ID.fullmatch(text) is not None


def client_channel(client_id: str) -> str:
    return CLIENT_CHANNEL_PREFIX + client_id


def identity_channel(identity: str) -> str:
    return IDENTITY_CHANNEL_PREFIX + identity


def identity_group(identity: str) -> str:
    return IDENTITY_GROUP_PREFIX + identity


def worker_of(channel: str) -> str | None:
    """The worker holding the client of a client channel; None for any other channel."""
    if not channel.startswith(CLIENT_CHANNEL_PREFIX):
        return None
    worker, dot, _ = channel[len(CLIENT_CHANNEL_PREFIX) :].partition(".")
    return worker if dot else None


def is_internal(channel: str) -> bool:
    return channel.startswith(INTERNAL_PREFIX)


def run_channel(run_id: str) -> str:
    return RUN_CHANNEL_PREFIX + run_id


def run_of(channel: str) -> str | None:
    """The run whose channel this is; None for any other channel."""
    return channel[len(RUN_CHANNEL_PREFIX) :] if channel.startswith(RUN_CHANNEL_PREFIX) else None


RUN_END_PREFIX = b"event: " + RUN_END_EVENT.encode() + b"\n"
"""How a run's terminal event starts, as stored and delivered."""


def is_run_end(channel: str, payload: bytes) -> bool:
    """Whether a message is a run's terminal event."""
    return channel.startswith(RUN_CHANNEL_PREFIX) and payload.startswith(RUN_END_PREFIX)


def presence_channel(channel: str) -> str:
    return PRESENCE_CHANNEL_PREFIX + channel
