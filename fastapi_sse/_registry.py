"""Who is connected to this process: clients by id, by channel and by identity.

Every client listens to two internal channels besides its own: ``$all`` and its
client channel. The first member of a channel and the last one to leave call the
registry's hooks (a shared backend must start or stop delivering the channel here),
and closing a client (:meth:`Registry.close`) is the one way a client leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from fastapi_sse._names import ALL_CHANNEL, CLIENT_CHANNEL_PREFIX, client_channel, identity_channel, is_internal
from fastapi_sse.client import SSEClient

_Members = dict[str, SSEClient]


class Registry:
    """The clients of this process; see the module's docstring."""

    __slots__ = ("_on_close", "_on_first", "_on_last", "_on_presence", "channels", "clients", "identities", "present")

    def __init__(
        self,
        *,
        on_first: Callable[[str], None],
        on_last: Callable[[str], None],
        on_close: Callable[[SSEClient, str], None],
        on_presence: Callable[[str, str, int, int], None] = lambda channel, identity, before, after: None,
    ) -> None:
        self.clients: _Members = {}
        self.channels: dict[str, _Members] = {}
        self.identities: dict[str, _Members] = {}
        self._on_first = on_first
        self._on_last = on_last
        self._on_close = on_close
        self._on_presence = on_presence
        # Per channel (the app's own, not internal ones): identity -> its streams here.
        self.present: dict[str, dict[str, int]] = {}

    def __len__(self) -> int:
        return len(self.clients)

    def __iter__(self) -> Iterator[SSEClient]:
        """The clients, oldest first (a copy: closing them while iterating is safe)."""
        return iter(list(self.clients.values()))

    def get(self, client_id: str) -> SSEClient | None:
        return self.clients.get(client_id)

    def members(self, channel: str) -> _Members | None:
        """The clients listening to ``channel`` (the registry's own dict: do not change it)."""
        members = self.channels.get(channel)
        if members is None and channel.startswith(CLIENT_CHANNEL_PREFIX):
            client = self.clients.get(channel[len(CLIENT_CHANNEL_PREFIX) :])
            if client is not None:
                return {client.id: client}
        return members

    def of_identity(self, identity: str) -> _Members:
        return self.identities.get(identity) or {}

    def add(self, client: SSEClient) -> None:
        self.clients[client.id] = client
        if client.identity is not None:
            self.identities.setdefault(client.identity, {})[client.id] = client
        self.join(client, ALL_CHANNEL)
        # A client's own channel has one member, the client itself: it is found through
        # ``clients`` (see :meth:`members`) rather than kept as a dict of its own.
        self._on_first(client_channel(client.id))

    def subscribe(self, client: SSEClient, channel: str) -> None:
        client.channels.add(channel)
        self.join(client, channel)
        if client.identity is not None and not is_internal(channel):
            self._count(channel, client.identity, 1)

    def unsubscribe(self, client: SSEClient, channel: str) -> None:
        client.channels.discard(channel)
        self.leave(client, channel)
        if client.identity is not None and not is_internal(channel):
            self._count(channel, client.identity, -1)

    def _count(self, channel: str, identity: str, change: int) -> None:
        """An identity's streams on a channel in this process changed: tell presence."""
        here = self.present.setdefault(channel, {})
        before = here.get(identity, 0)
        streams = before + change
        if streams > 0:
            here[identity] = streams
        else:
            here.pop(identity, None)
            if not here:
                del self.present[channel]
        self._on_presence(channel, identity, before, max(streams, 0))

    def join(self, client: SSEClient, channel: str) -> None:
        members = self.channels.get(channel)
        if members is None:
            members = self.channels[channel] = {}
            self._on_first(channel)
        members[client.id] = client

    def leave(self, client: SSEClient, channel: str) -> None:
        members = self.channels.get(channel)
        if members is None:
            return
        members.pop(client.id, None)
        if not members:
            del self.channels[channel]
            self._on_last(channel)

    def close(self, client: SSEClient, reason: str, *, discard: bool) -> bool:
        """Remove a client from every registry and tell its stream to end: after what
        it has buffered, or at once (``discard``). False when it was already gone."""
        if self.clients.pop(client.id, None) is None:
            return False
        for channel in client.channels:
            self.leave(client, channel)
            if client.identity is not None and not is_internal(channel):
                self._count(channel, client.identity, -1)
        self.leave(client, ALL_CHANNEL)
        self._on_last(client_channel(client.id))
        if client.identity is not None:
            mine = self.identities.get(client.identity)
            if mine is not None:
                mine.pop(client.id, None)
                if not mine:
                    del self.identities[client.identity]
        self._on_close(client, reason)
        client.mark_closed(reason, discard=discard)
        return True


def readable(client: SSEClient) -> tuple[str, ...]:
    """A client's channels and its identity's pseudo channel (ids resolve through them)."""
    if client.identity is None:
        return tuple(client.channels)
    return (*client.channels, identity_channel(client.identity))
