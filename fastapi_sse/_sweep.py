"""The service's periodic task: one for every client, not a timer each.

Every quarter of ``heartbeat_interval`` it pings the streams that have been idle,
disconnects those whose write has been blocked past ``send_timeout`` (the client
stopped reading), and releases clients whose response never started within
``attach_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from fastapi_sse import _wire as wire
from fastapi_sse._registry import Registry
from fastapi_sse.client import DisconnectReason, Frame
from fastapi_sse.settings import SSESettings

logger = logging.getLogger("fastapi_sse")


async def sweep(registry: Registry, settings: SSESettings) -> None:
    interval = settings.heartbeat_interval
    loop = asyncio.get_running_loop()
    ping = Frame(0, "", wire.PING)
    while True:
        await asyncio.sleep(interval / 4)
        now = loop.time()
        idle_since = now - interval * 0.75
        never_started = datetime.now(UTC).timestamp() - settings.attach_timeout
        stuck_since = now - settings.send_timeout
        for client in registry:
            outlet = client.outlet
            if outlet is not None:
                if outlet.sending:
                    if outlet.last_write <= stuck_since:
                        logger.warning(
                            "client %s is reading too slowly: a write has been blocked for more than "
                            "send_timeout=%ss; disconnected, it will reconnect and replay",
                            client.id,
                            settings.send_timeout,
                        )
                        registry.close(client, DisconnectReason.SLOW_CONSUMER, discard=True)
                elif outlet.last_write <= idle_since and not client.buffered_bytes:
                    client.push(ping)
            elif not client.attached and client.created_at.timestamp() < never_started:
                registry.close(client, DisconnectReason.NEVER_STARTED, discard=True)
