"""The connection statistics the admin route returns."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the write latency histogram's buckets; one more bucket holds the rest."""


class ConnectionStats(BaseModel):
    """Connection statistics: total, by channel and oldest connection, then what an operator needs."""

    scope: Literal["worker", "cluster"] = Field(
        description="`worker`: this process only; `cluster`: every worker sharing the backend."
    )
    worker_id: str = Field(description="Id of the process that answered.")
    backend: str = Field(description="The backend in use.")
    total_connections: int = Field(description="Open streams.")
    by_channel: dict[str, int] = Field(description="Open streams per channel.")
    oldest_connection: datetime | None = Field(description="When the oldest open stream connected (UTC).")
    connects: int = Field(0, description="Streams opened since start.")
    disconnects: dict[str, int] = Field(
        default_factory=dict,
        description="Streams ended since start, by reason: client_closed, removed, replaced, "
        "slow_consumer, shutdown, never_started, backend_gap, backend_unavailable.",
    )
    refused: dict[str, int] = Field(default_factory=dict, description="Connections refused, by limit.")
    events_published: int = Field(0, description="Events published through this process.")
    events_sent: int = Field(0, description="Events written to clients (one per client per event).")
    bytes_sent: int = Field(0, description="Bytes written to clients, heartbeats included.")
    events_dropped: int = Field(0, description="Events dropped by the drop_oldest / drop_newest policies.")
    slow_consumer_disconnects: int = Field(0, description="Clients disconnected for reading too slowly.")
    resumes: int = Field(0, description="Connections that came with a Last-Event-ID.")
    resume_gaps: int = Field(0, description="Resumes whose history no longer covered the gap.")
    publish_failures: int = Field(0, description="Publishes the backend did not accept.")
    pending_publishes: int = Field(0, description="Fire-and-forget publishes waiting for the backend.")
    streaming: int = Field(
        0, description="Responses still writing: a closed stream ends once it has written what it holds."
    )
    workers: int = Field(default=1, description="Workers counted (live workers sharing the backend for `cluster`).")


__all__ = ["ConnectionStats"]
