"""From the backend to the clients: each message framed once, queued for each
subscriber of its channel; and what happens to a client that cannot keep up."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection

from fastapi_sse import _wire as wire
from fastapi_sse._counters import Counters
from fastapi_sse._names import CLIENT_CHANNEL_PREFIX, CLOSE, is_run_end
from fastapi_sse._registry import Registry
from fastapi_sse._writer import Writer
from fastapi_sse.backends.base import Message
from fastapi_sse.client import DisconnectReason, Frame, SSEClient

logger = logging.getLogger("fastapi_sse")


class Fanout:
    """The service's :class:`~fastapi_sse.backends.base.Sink`: what a backend hands
    messages to."""

    __slots__ = ("counters", "policy", "registry", "writer")

    def __init__(self, registry: Registry, writer: Writer, counters: Counters, policy: str) -> None:
        self.registry = registry
        self.writer = writer
        self.counters = counters
        self.policy = policy

    def deliver(self, message: Message) -> None:
        """Fan one message out to this process's subscribers, framed once."""
        members = self.registry.members(message.channel)
        if not members:
            return
        if message.payload == CLOSE and message.channel.startswith(CLIENT_CHANNEL_PREFIX):
            for client in list(members.values()):
                self.registry.close(client, DisconnectReason.REPLACED, discard=False)
            return
        frame = Frame(message.seq, message.channel, wire.frame(message.id, message.payload), time.monotonic())
        for client in list(members.values()):
            client.push(frame)
        if is_run_end(message.channel, message.payload):
            # A run's viewers end with its terminal event, once it is written.
            for client in list(members.values()):
                self.registry.close(client, DisconnectReason.RUN_ENDED, discard=False)

    def lost(self, channels: Collection[str]) -> None:
        """Close the clients of channels whose missed events the backend could not
        deliver, so that they resume (and get the ``gap`` event if history lost them)."""
        doomed: dict[str, SSEClient] = {}
        for channel in channels:
            doomed.update(self.registry.members(channel) or {})
        for client in doomed.values():
            self.registry.close(client, DisconnectReason.BACKEND_GAP, discard=False)

    async def settle(self) -> None:
        await self.writer.settled()

    def overflow(self, client: SSEClient, dropped: int) -> None:
        """A client's buffer is full: it dropped ``dropped`` frames, or (0) it must go."""
        if dropped:
            self.counters.dropped += dropped
            logger.warning(
                "client %s is reading too slowly: dropped %d event(s) (overflow_policy=%s)",
                client.id,
                dropped,
                self.policy,
            )
            return
        logger.warning(
            "client %s is reading too slowly: disconnected after %d buffered bytes; it will reconnect and replay",
            client.id,
            client.buffered_bytes,
        )
        self.registry.close(client, DisconnectReason.SLOW_CONSUMER, discard=True)
