"""The loop a service runs on, and the way there from other threads.

The registries and the streams' futures belong to the service's loop, so the methods
that change them run there: called from a sync handler or a job's thread, they hop
to the loop and wait for the answer.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

_S = TypeVar("_S")
_P = ParamSpec("_P")
_R = TypeVar("_R")


class LoopThread:
    """The running loop of a started service and the thread that runs it."""

    __slots__ = ("loop", "thread")

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: int | None = None

    def bind(self) -> asyncio.AbstractEventLoop:
        """Bind to the running loop; called on it."""
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()
        return self.loop

    def on_loop(self) -> bool:
        """Whether the caller runs on the bound loop's thread."""
        return threading.get_ident() == self.thread

    def elsewhere(self) -> asyncio.AbstractEventLoop | None:
        """The bound loop when called from another thread while it runs, else None."""
        loop = self.loop
        if loop is None or threading.get_ident() == self.thread or not loop.is_running():
            return None
        return loop


def run_in(loop: asyncio.AbstractEventLoop, fn: Callable[[], _R]) -> _R:
    """Run ``fn`` on ``loop`` from another thread and return (or raise) its result."""

    async def call() -> _R:
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), loop).result()


def on_loop(
    loop_of: Callable[[_S], LoopThread],
) -> Callable[[Callable[Concatenate[_S, _P], _R]], Callable[Concatenate[_S, _P], _R]]:
    """Decorate a method that must run on its object's loop (``loop_of(self)``): from
    another thread, the call runs there and its result (or error) comes back."""

    def decorate(method: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R]:
        @functools.wraps(method)
        def hop(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            loop = loop_of(self).elsewhere()
            if loop is None:
                return method(self, *args, **kwargs)
            return run_in(loop, lambda: method(self, *args, **kwargs))

        return hop

    return decorate
