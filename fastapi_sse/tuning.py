"""Opt-in garbage-collector tuning for processes holding many open streams."""

from __future__ import annotations

import gc


def tune_gc(threshold0: int = 50_000, threshold1: int = 50, threshold2: int = 100) -> None:
    """Make full collections rare and short in a long-running server.

    Call it once the app has started (e.g. at the end of the lifespan's startup).
    It moves every object alive now (modules, classes, the app) to the permanent
    generation with :func:`gc.freeze`, so no later collection walks them again, and
    raises the thresholds so the young generation is collected after 50,000
    allocations instead of 700. Each open stream allocates a few dozen objects that
    live as long as the connection; with the default thresholds thousands of
    connections trigger frequent full collections that walk all of them while no
    event is written.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(threshold0, threshold1, threshold2)


__all__ = ["tune_gc"]
