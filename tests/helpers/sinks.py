"""A backend's sink for tests of the backend contract: what it delivered and lost."""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from fastapi_sse import Message


class Inbox:
    """What a backend delivered (and the channels it reported lost), with a way to
    wait for it."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.lost_channels: list[list[str]] = []
        self._changed = asyncio.Event()

    def deliver(self, message: Message) -> None:
        self.messages.append(message)
        self._changed.set()

    def lost(self, channels: Collection[str]) -> None:
        self.lost_channels.append(sorted(channels))

    async def settle(self) -> None:
        await asyncio.sleep(0)

    async def wait_for(self, count: int, within: float = 5.0) -> list[Message]:
        async with asyncio.timeout(within):
            while len(self.messages) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.messages
