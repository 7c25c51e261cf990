"""Backends carry events between processes and keep the history clients replay."""

from fastapi_sse.backends.base import Backend, Coordination, Message, NoCoordination, Publication, Replay, Sink
from fastapi_sse.backends.memory import MemoryBackend

__all__ = ["Backend", "Coordination", "MemoryBackend", "Message", "NoCoordination", "Publication", "Replay", "Sink"]
