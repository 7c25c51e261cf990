"""Where the Redis backend keeps what: the names of its keys and pubsub channels.

Every name starts with the backend's ``key_prefix``, so several services (or test
runs) can share one Redis.
"""

from __future__ import annotations

from fastapi_sse._names import worker_of


class Keys:
    """The keys and pubsub channels of one backend, under its prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.seq, self.last, self.live = prefix + "seq", prefix + "last", prefix + "live"
        self.trim, self.floor, self.dead = prefix + "trim", prefix + "floor", prefix + "dead"
        self.ids, self.id_times = prefix + "ids", prefix + "idtimes"
        self.workers = prefix + "workers"
        """Set of the registered worker ids."""
        self.sys = prefix + "sys"
        """Pubsub channel every worker subscribes to."""
        self.history_prefix = prefix + "h:"
        """A channel's history is this and the channel's name."""
        self.worker_prefix = prefix + "wk:"
        self.presence_prefix = prefix + "pres:"
        self.presence_workers = prefix + "presw"
        """Set of the workers that hold presence somewhere."""
        self.presence_held_prefix = prefix + "presw:"
        """A worker's set of the channels it holds presence on is this and its id."""
        """A worker's registration is this and its id."""
        self._worker_route = prefix + "w:"

    def history(self, channel: str) -> str:
        return self.history_prefix + channel

    def worker(self, worker_id: str) -> str:
        """The registration key of a worker (its info, with a TTL)."""
        return self.worker_prefix + worker_id

    def presence(self, channel: str) -> str:
        """The hash of who is on a channel (see ``lua/presence.lua``)."""
        return self.presence_prefix + channel

    def group(self, group: str) -> str:
        """The sorted set of a capped group's members."""
        return self.prefix + "g:" + group

    def token(self, name: str) -> str:
        """The key that marks one call of the publish script as done."""
        return self.prefix + "done:" + name

    def route(self, channel: str) -> str:
        """The pubsub channel a channel's events travel on."""
        # A client's channel travels on its worker's Redis channel, so a worker holds
        # one subscription for all its clients instead of one per client.
        worker = worker_of(channel)
        if worker is not None:
            return self._worker_route + worker
        return self.prefix + "c:" + channel

    def backlog(self, channel: str) -> str | None:
        """The backlog key of the worker that holds a client channel's client."""
        return self.route_backlog(self.route(channel))

    def route_backlog(self, route: str) -> str | None:
        """The backlog key of a worker's route; None for a route of a channel."""
        if not route.startswith(self._worker_route):
            return None
        return self.prefix + "wb:" + route[len(self._worker_route) :]
