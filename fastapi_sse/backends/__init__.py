"""Backends carry events between processes and keep the history clients replay."""

from fastapi_sse.backends.base import Backend, Message, Publication, Replay
from fastapi_sse.backends.memory import MemoryBackend

__all__ = ["Backend", "MemoryBackend", "Message", "Publication", "Replay"]
