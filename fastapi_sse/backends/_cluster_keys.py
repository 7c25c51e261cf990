"""Where the Redis Cluster backend keeps what: each channel's keys and shard channel
share one hash tag, so that one script stores and announces its events.

A channel's tag is its own name; the channels of one worker's clients share the
worker's tag, so that a worker holds one shard subscription for all its clients.
Workers, groups, presence and runs live under one tag of their own.
"""

from __future__ import annotations

from fastapi_sse._names import worker_of
from fastapi_sse.errors import BackendError


class ClusterKeys:
    """The keys and shard channels of one backend, under its prefix."""

    def __init__(self, prefix: str) -> None:
        if "{" in prefix or "}" in prefix:
            raise BackendError(
                f"SSE_REDIS_KEY_PREFIX {prefix!r} holds a brace: on a Redis Cluster the backend "
                "chooses the hash tags itself; use a prefix without '{' and '}'"
            )
        self.prefix = prefix
        self.shared = prefix + "{shared}:"
        """The prefix of the keys every worker shares (workers, groups, presence, runs)."""

    def tag(self, channel: str) -> str:
        """The hash tag of a channel's keys: the channel, or its worker for a client channel."""
        worker = worker_of(channel)
        return channel if worker is None else "w:" + worker

    def base(self, tag: str) -> str:
        """The key every key of a tag starts with; also the tag's shard channel."""
        return self.prefix + "{" + tag + "}"

    def history(self, channel: str) -> str:
        return self.base(self.tag(channel)) + ":h:" + channel

    def backlog(self, tag: str) -> str:
        return self.base(tag) + ":b"

    def sequence(self, tag: str) -> str:
        return self.base(tag) + ":s"

    def token(self, tag: str, name: str) -> str:
        return self.base(tag) + ":done:" + name
