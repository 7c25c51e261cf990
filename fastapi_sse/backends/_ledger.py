"""The state of runs shared by the workers of a backend (see :class:`RunLedger`);
:mod:`fastapi_sse.backends.base` exports it with the rest of the backend contract."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RunState:
    """A run as :class:`RunLedger` knows it."""

    live: bool
    """Its producer holds the lease (it renewed it within the lease's time)."""
    ended: bool
    """Its terminal event was claimed: by its producer, or for it once the lease lapsed."""
    cancelled: bool
    """Someone asked it to stop."""
    first: int = 0
    """The sequence number its events come after (the head when it began)."""


class RunLedger(ABC):
    """Who produces each run, and whether it ended or was asked to stop: shared by
    every worker of a backend, so that a viewer anywhere knows when a run's producer
    died and a cancel from anywhere reaches it. A run's id is held from
    :meth:`begin` until ``retain`` seconds after its end."""

    @abstractmethod
    async def begin(self, run_id: str, owner: str, *, first: int, lease: float, retain: float) -> bool:
        """Take ``run_id`` for a new run produced by ``owner``, whose events come after
        sequence number ``first``, holding the lease for ``lease`` seconds; False when
        the id is in use or still retained."""

    @abstractmethod
    async def renew(self, run_id: str, owner: str, *, lease: float) -> RunState | None:
        """Extend the lease of ``owner``'s run; its state (``live`` False when the lease
        is no longer ``owner``'s), or None when the ledger lost the run."""

    @abstractmethod
    async def cancel(self, run_id: str) -> bool:
        """Ask a run to stop; True when it had not ended."""

    @abstractmethod
    async def end(self, run_id: str, *, retain: float) -> bool:
        """Claim a run's end, keeping its id ``retain`` seconds more; True for the one
        call that ends it (the caller then publishes its terminal event)."""

    @abstractmethod
    async def state(self, run_id: str) -> RunState | None:
        """A run's state, or None when the id is unknown (never begun, or forgotten)."""


__all__: list[str] = []  # exported by fastapi_sse.backends.base
