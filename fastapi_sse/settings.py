"""Configuration of the SSE service, read from ``SSE_*`` environment variables."""

from __future__ import annotations

import difflib
import importlib
import re
import warnings
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from fastapi_sse.errors import SettingsError

OverflowPolicy = Literal["disconnect", "drop_oldest", "drop_newest"]
IdentityLimitPolicy = Literal["remove_oldest", "refuse"]
BackendName = Literal["memory", "redis", "redis-cluster"]

ENV_PREFIX = "SSE_"


class SSESettings(BaseSettings):
    """Every knob of the service. Each field is read from ``SSE_<NAME>``.

    Build one with keyword arguments in code, or let the service read the
    environment (and the ``.env`` file you name with ``_env_file=``) when it starts.
    A keyword that names no setting raises :class:`SettingsError` naming the closest
    one; an ``SSE_*`` variable that names none is ignored, and the service warns about
    it when it starts.
    """

    # "ignore", not "forbid": forbid would also refuse the app's start over any stray
    # SSE_* variable or .env line; unknown keywords are refused in settings_customise_sources.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    heartbeat_interval: float = Field(
        default=30.0,
        gt=0,
        description="Seconds an idle stream may stay silent before a `: ping` comment is sent.",
    )
    retry_interval: float = Field(
        default=3.0,
        gt=0,
        description="Seconds a browser waits before reconnecting; sent as `retry:` in milliseconds.",
    )
    backend: BackendName = Field(
        default="memory",
        description=(
            "Where events travel and history is kept: `memory` (one process), `redis` (one Redis "
            "server) or `redis-cluster` (a Redis Cluster, 7.0 or newer: channels sharded over its masters)."
        ),
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis server used when `backend` is `redis`; any node of the cluster for `redis-cluster`.",
    )
    redis_key_prefix: str = Field(
        default="sse:",
        min_length=1,
        description="Prefix of every Redis key and channel this service uses.",
    )
    redis_timeout: float = Field(
        default=5.0,
        gt=0,
        description="Seconds to wait for Redis to connect or answer a command before it counts as unreachable.",
    )
    redis_max_connections: int = Field(
        default=50,
        ge=1,
        description=(
            "Connections in each worker's pool for publishing, replay and opening streams. "
            "When all are busy, a caller waits up to redis_timeout for one."
        ),
    )
    redis_max_backoff: float = Field(
        default=5.0,
        gt=0,
        description="Longest wait, in seconds, between attempts to reconnect to Redis (the wait doubles from 0.05 s).",
    )
    redis_health_interval: float = Field(
        default=5.0,
        gt=0,
        description=(
            "Seconds of silence on the Redis subscription connection before it is probed with PING; "
            "no answer within as long again and the worker reconnects."
        ),
    )
    redis_id_index_size: int = Field(
        default=100_000,
        gt=0,
        description=(
            "Caller-given event ids (e.g. `msg-123`) remembered in Redis for resuming, counted per "
            "channel they resolve through (a `send_to` id counts once per channel of its recipient); "
            "the oldest go first."
        ),
    )
    presence: bool = Field(
        default=False,
        description=(
            "Track who is on each channel (`sse.presence`, the router's `presence=true`): each "
            "subscribe and end of a stream opened with an identity then updates it, on a shared "
            "backend with a round trip to the store."
        ),
    )
    presence_interval: float = Field(
        default=5.0,
        gt=0,
        description=(
            "Seconds between refreshes of this worker's registration and stats in a shared backend; "
            "a worker silent for three intervals no longer counts in cluster stats and limits."
        ),
    )
    history_size: int = Field(
        default=1000,
        ge=0,
        description="Events kept per channel for replay to reconnecting clients (0 keeps none).",
    )
    history_ttl: float = Field(
        default=3600.0,
        gt=0,
        description="Seconds an event stays available for replay.",
    )
    run_history_size: int = Field(
        default=10_000,
        ge=1,
        description="Events a run keeps for its viewers (its whole output, up to this many).",
    )
    run_retention: float = Field(
        default=3600.0,
        gt=0,
        description="Seconds a run stays viewable after its end; its id is not reused meanwhile.",
    )
    run_lease: float = Field(
        default=10.0,
        gt=0,
        description=(
            "Seconds a run's producer holds its run without renewing: if its process dies, the "
            "run's viewers get its terminal event within about this long."
        ),
    )
    run_poll_interval: float = Field(
        default=0.5,
        gt=0,
        description=(
            "Seconds between a producer's renewals of its run (which also bring a cancel from "
            "another worker), and between checks by viewers' workers for producers that died."
        ),
    )
    max_buffer_bytes: int = Field(
        default=256 * 1024,
        ge=1024,
        description="Bytes of unsent events held for one slow client before its overflow policy applies.",
    )
    overflow_policy: OverflowPolicy = Field(
        default="disconnect",
        description=(
            "What happens to a client whose buffer is full: `disconnect` (it reconnects and "
            "replays), `drop_oldest` or `drop_newest` (events are dropped and counted)."
        ),
    )
    max_connections: int = Field(
        default=10_000,
        gt=0,
        description="Open streams allowed in this process; more are refused with HTTP 503.",
    )
    max_connections_per_identity: int = Field(
        default=5,
        gt=0,
        description="Open streams allowed for one identity (e.g. one user).",
    )
    identity_limit_policy: IdentityLimitPolicy = Field(
        default="remove_oldest",
        description=(
            "When an identity is at its limit: `remove_oldest` closes its oldest stream, `refuse` answers HTTP 429."
        ),
    )
    max_channels_per_connection: int = Field(
        default=32,
        gt=0,
        description="Channels one stream may subscribe to.",
    )
    max_channel_length: int = Field(
        default=200,
        gt=0,
        description="Characters allowed in a channel name.",
    )
    channel_pattern: str = Field(
        default=r"[A-Za-z0-9][A-Za-z0-9_.:@/=+\-]*",
        description="Regular expression a whole channel name must match.",
    )
    max_event_bytes: int = Field(
        default=64 * 1024,
        gt=0,
        description="Largest encoded event in bytes; larger ones are rejected when published.",
    )
    max_last_event_id_length: int = Field(
        default=128,
        gt=0,
        description="Longest `Last-Event-ID` (and event id) accepted, in characters.",
    )
    send_timeout: float = Field(
        default=30.0,
        gt=0,
        description=(
            "Seconds one write to a client may stay blocked (the client stopped reading) "
            "before the client is disconnected as a slow consumer."
        ),
    )
    attach_timeout: float = Field(
        default=30.0,
        gt=0,
        description=("Seconds a client made by `add_client` may wait for its response to start before it is removed."),
    )
    retry_jitter: float = Field(
        default=0.2,
        ge=0,
        lt=1,
        description=(
            "Spread of each stream's `retry:` delay: retry_interval times a random factor between "
            "1 - jitter and 1 + jitter, so that streams ended together do not reconnect together."
        ),
    )
    hard_refusals: bool = Field(
        default=False,
        description=(
            "Answer a stream refused for load, a limit or shutdown with HTTP 503 or 429, which makes "
            "a browser's EventSource stop for good. By default it gets a 200 stream that sets `retry:` "
            "and ends, so the browser comes back later."
        ),
    )
    drain_window: float = Field(
        default=5.0,
        ge=0,
        description=(
            "Seconds over which SIGTERM or SIGINT ends the open streams, in waves, so that their "
            "reconnects spread over the other workers; keep it below uvicorn's "
            "--timeout-graceful-shutdown. 0 ends them all at once."
        ),
    )
    stream_outside_route: bool = Field(
        default=True,
        description=(
            "Run an open stream outside its route once its opening is written: the route's "
            "dependencies with `yield` close then, and its frames are freed (about 10 KiB per "
            "connection). `false` keeps each stream inside its route until it ends."
        ),
    )
    publish_buffer_bytes: int = Field(
        default=64 * 2**20,
        ge=64 * 1024,
        description=(
            "Bytes of fire-and-forget publishes held while a remote backend is unreachable "
            "(from its first failed send until one succeeds); beyond it they are counted as "
            "failed and logged. While the backend is reachable nothing is refused."
        ),
    )
    publish_buffer_size: int | None = Field(
        default=None,
        gt=0,
        description=(
            "Deprecated: bound the outbox with `publish_buffer_bytes`. When set, it also caps "
            "the number of fire-and-forget publishes held while a remote backend is unreachable."
        ),
    )

    @field_validator("publish_buffer_size")
    @classmethod
    def _deprecated_count(cls, value: int | None) -> int | None:
        if value is not None:
            warnings.warn(
                "publish_buffer_size (SSE_PUBLISH_BUFFER_SIZE) is deprecated: the outbox is bounded by "
                "publish_buffer_bytes (SSE_PUBLISH_BUFFER_BYTES)",
                DeprecationWarning,
                stacklevel=2,
            )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        unknown = sorted(set(init_settings()) - set(cls.model_fields))
        if unknown:
            raise SettingsError("; ".join(_unknown_keyword(name, list(cls.model_fields)) for name in unknown))
        return init_settings, env_settings, dotenv_settings, file_secret_settings

    @field_validator("backend")
    @classmethod
    def _backend_installed(cls, value: str) -> str:
        if value in ("redis", "redis-cluster"):
            extra = "redis" if value == "redis" else "redis-cluster"
            try:
                importlib.import_module("redis.asyncio")
                client = importlib.import_module("redis.asyncio.client")
            except ImportError:
                raise ValueError(
                    f"the {value} backend needs redis-py: pip install 'fastapi-sse-channels[{extra}]'"
                ) from None
            if value == "redis-cluster" and not hasattr(client.PubSub, "ssubscribe"):
                raise ValueError(
                    "the redis-cluster backend needs redis-py 8.0 or newer (sharded pub/sub from asyncio): "
                    "pip install 'fastapi-sse-channels[redis-cluster]'"
                )
        return value

    @field_validator("channel_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


def _unknown_keyword(name: str, fields: list[str]) -> str:
    closest = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    hint = f": did you mean {closest[0]!r}?" if closest else f" (the settings: {', '.join(fields)})"
    return f"SSESettings has no setting {name!r}{hint}"


def load_settings(**overrides: Any) -> SSESettings:
    """Read settings from the environment; a bad value raises :class:`SettingsError`
    naming the environment variable."""
    try:
        return SSESettings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            env = ENV_PREFIX + field.upper()
            got = error.get("input")
            problems.append(f"{env}: {error['msg']} (got {got!r})")
        raise SettingsError("invalid SSE settings: " + "; ".join(problems)) from None


__all__ = ["SSESettings", "load_settings"]
