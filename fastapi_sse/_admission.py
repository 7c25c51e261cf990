"""What may come in: channel names, events, cursors, and the limits on streams.

Every check raises an error that names the rule (an :class:`SSEError`, which FastAPI
turns into a 4xx), the same through the router and through an app's own route.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from fastapi_sse import _positions
from fastapi_sse import _wire as wire
from fastapi_sse._counters import Counters
from fastapi_sse._names import ALL_CHANNEL, is_internal
from fastapi_sse.backends.base import Publication
from fastapi_sse.client import SSEClient
from fastapi_sse.errors import BadRequestError, InvalidChannelError, InvalidEventError, LimitExceededError
from fastapi_sse.settings import SSESettings
from fastapi_sse.typed import EventType, EventTypes

_NONE_DECLARED: dict[str, EventType] = {}


class Admission:
    """The checks and limits of one service's settings."""

    __slots__ = ("_channel_re", "_declared", "counters", "cursor_length", "events", "settings")

    def __init__(
        self, settings: SSESettings, counters: Counters, events: EventTypes | None = None, *, positions: bool = False
    ) -> None:
        self.settings = settings
        self.counters = counters
        self.events = events
        self._channel_re = re.compile(settings.channel_pattern)
        self.cursor_length = settings.max_last_event_id_length
        """The longest ``Last-Event-ID`` accepted: longer where ids carry a position on
        each channel of a stream (``positions``: its own channels and the service's)."""
        if positions:
            self.cursor_length = _positions.longest(
                settings.max_channels_per_connection + 8, settings.max_last_event_id_length
            )
        # A live read-only view: events declared after the service was built count too.
        self._declared: Mapping[str, EventType] = events.types if events is not None else _NONE_DECLARED

    def check_channel(self, channel: str) -> str:
        """Raise :class:`InvalidChannelError` unless ``channel`` is a valid name."""
        settings = self.settings
        if not isinstance(channel, str) or not channel:
            raise InvalidChannelError(f"channel must be a non-empty string, got {channel!r}")
        if len(channel) > settings.max_channel_length:
            raise InvalidChannelError(
                f"channel name is {len(channel)} characters, more than max_channel_length={settings.max_channel_length}"
            )
        if not self._channel_re.fullmatch(channel):
            raise InvalidChannelError(
                f"channel {channel!r} does not match the allowed pattern {settings.channel_pattern!r}"
            )
        return channel

    def check_subscription(self, client: SSEClient) -> None:
        """Raise :class:`LimitExceededError` when ``client`` may not take one more channel
        (the service's own channels, a run's or a channel's presence, do not count)."""
        limit = self.settings.max_channels_per_connection
        if len(client.channels) >= limit and sum(not is_internal(c) for c in client.channels) >= limit:
            raise LimitExceededError(
                "max_channels_per_connection",
                f"a stream may subscribe to at most {limit} channels (max_channels_per_connection)",
                400,
            )

    def cursor(self, last_event_id: str | None) -> str | None:
        """A client's ``Last-Event-ID`` checked (``""`` means none); raises
        :class:`BadRequestError` for a malformed one."""
        if last_event_id is None:
            return None
        try:
            wire.check_last_event_id(last_event_id, self.cursor_length)
        except ValueError as exc:
            raise BadRequestError(str(exc)) from None
        return last_event_id or None

    def event(self, channel: str, event: str, data: Any, event_id: str | None) -> Publication:
        """An event for a channel's history and subscribers, checked and encoded."""
        return Publication(self.check_channel(channel), self.encode(event, data, event_id), event_id, True)

    def to_all(self, event: str, data: Any, event_id: str | None) -> Publication:
        """An event for every client, checked and encoded."""
        return Publication(ALL_CHANNEL, self.encode(event, data, event_id), event_id, True)

    def encode(self, event: str, data: Any, event_id: str | None) -> bytes:
        """An event's name and data as SSE lines (without its id), checked; the data of
        a declared event is validated against its model first. Every publishing method
        passes here, in the caller's thread."""
        name = wire.check_event_name(event)
        if event_id is not None:
            wire.check_event_id(event_id, self.settings.max_last_event_id_length)
        declared = self._declared.get(event)
        text = wire.encode_data(data) if declared is None else declared.encode(data)
        payload = wire.frame_payload(name, text)
        if len(payload) > self.settings.max_event_bytes:
            raise InvalidEventError(
                f"event {event!r} is {len(payload)} bytes encoded, more than max_event_bytes="
                f"{self.settings.max_event_bytes}; send an id and let the client fetch the rest"
            )
        return payload

    def refusal(self, *, closing: bool, open_streams: int) -> LimitExceededError | None:
        """Why a new stream may not open now (shutdown, ``max_connections``), or None."""
        settings = self.settings
        if closing:
            return LimitExceededError(
                "shutdown", "the server is shutting down", 503, retry_after=math.ceil(settings.retry_interval)
            )
        if open_streams >= settings.max_connections:
            return LimitExceededError(
                "max_connections",
                f"too many open streams (max_connections={settings.max_connections})",
                503,
                retry_after=math.ceil(settings.retry_interval),
            )
        return None

    def identity_refusal(self) -> LimitExceededError:
        """The error for a stream past ``max_connections_per_identity`` (``refuse``)."""
        limit = self.settings.max_connections_per_identity
        return LimitExceededError(
            "max_connections_per_identity",
            f"too many open streams for this user (max_connections_per_identity={limit})",
            429,
        )
