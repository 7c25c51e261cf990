"""Server-Sent Events for FastAPI: channels, broadcasting, replay and heartbeats."""

from fastapi_sse._names import PRESENCE_EVENT, RUN_END_EVENT
from fastapi_sse._presence import Presence, PresenceSnapshot
from fastapi_sse._runs import Runs
from fastapi_sse._wire import Text
from fastapi_sse.backends import (
    Backend,
    Coordination,
    MemoryBackend,
    MemoryRunLedger,
    Message,
    NoCoordination,
    Publication,
    Replay,
    RunLedger,
    RunState,
    Sink,
)
from fastapi_sse.client import DisconnectReason, SSEClient
from fastapi_sse.dependencies import SSEDep, get_sse, get_sse_from_app, sse_lifespan
from fastapi_sse.errors import (
    BackendError,
    BadRequestError,
    InvalidChannelError,
    InvalidEventError,
    LimitExceededError,
    RunCancelled,
    RunExistsError,
    RunNotFoundError,
    ServiceNotRunningError,
    SettingsError,
    SSEError,
)
from fastapi_sse.hooks import Authorize, DefaultChannels, Identify, OnConnect
from fastapi_sse.middleware import SSEMiddleware
from fastapi_sse.response import RefusedStream, SSEResponse
from fastapi_sse.router import allow_all, create_sse_router
from fastapi_sse.runs import Run
from fastapi_sse.service import ALL_CHANNEL, GAP_EVENT, SSEService
from fastapi_sse.settings import SSESettings, load_settings
from fastapi_sse.stats import ConnectionStats
from fastapi_sse.tuning import tune_gc
from fastapi_sse.typed import EventType, EventTypes

__all__ = [
    "ALL_CHANNEL",
    "GAP_EVENT",
    "PRESENCE_EVENT",
    "RUN_END_EVENT",
    "Authorize",
    "Backend",
    "BackendError",
    "BadRequestError",
    "ConnectionStats",
    "Coordination",
    "DefaultChannels",
    "DisconnectReason",
    "EventType",
    "EventTypes",
    "Identify",
    "InvalidChannelError",
    "InvalidEventError",
    "LimitExceededError",
    "MemoryBackend",
    "MemoryRunLedger",
    "Message",
    "NoCoordination",
    "OnConnect",
    "Presence",
    "PresenceSnapshot",
    "Publication",
    "RefusedStream",
    "Replay",
    "Run",
    "RunCancelled",
    "RunExistsError",
    "RunLedger",
    "RunNotFoundError",
    "RunState",
    "Runs",
    "SSEClient",
    "SSEDep",
    "SSEError",
    "SSEMiddleware",
    "SSEResponse",
    "SSEService",
    "SSESettings",
    "ServiceNotRunningError",
    "SettingsError",
    "Sink",
    "Text",
    "allow_all",
    "create_sse_router",
    "get_sse",
    "get_sse_from_app",
    "load_settings",
    "sse_lifespan",
    "tune_gc",
]
