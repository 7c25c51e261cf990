"""The openings of streams on a backend that numbers each channel on its own, and the
``gap`` event every opening may end with."""

from __future__ import annotations

from collections.abc import Collection

from fastapi_sse import _positions
from fastapi_sse import _wire as wire
from fastapi_sse._counters import Counters
from fastapi_sse._names import ALL_CHANNEL, CLIENT_CHANNEL_PREFIX, GAP_EVENT, is_internal
from fastapi_sse._replays import SharedReplays
from fastapi_sse.backends.base import Backend, Replay
from fastapi_sse.client import Frame, SSEClient


async def opening_each(
    backend: Backend, replays: Backend | SharedReplays, counters: Counters, client: SSEClient
) -> list[bytes]:
    """A stream's opening (``Streams.opening``) for a backend that numbers each channel on its own: the
    stream's ids carry its position on each channel, and a resume reads each
    channel from its own."""
    positions = client.positions
    assert positions is not None  # a client of such a backend has positions
    named = dict.fromkeys([*client.channels, ALL_CHANNEL])
    channels = [c for c in named if not c.startswith(CLIENT_CHANNEL_PREFIX)]
    if client.last_event_id is None:
        positions.advance_all(await backend.heads(channels))
        return [wire.cursor_frame(positions.text())]
    counters.resumes += 1
    cursors = await _positions.cursors_of(backend, client.last_event_id, channels)
    if cursors is None:
        heads = await backend.heads(channels)
        replay = Replay((), 0, frozenset(channels), heads=heads)
    else:
        replay = await replays.replay_each(cursors)
        positions.advance_all(cursors)
    heads = dict(replay.heads or {})
    replayed = {c: heads[c] for c in channels if c not in replay.gaps}
    client.skip_replayed_each(replayed)
    frames = [Frame(m.seq, m.channel, wire.frame(m.id, m.payload)) for m in replay.messages]
    queued = [f for f in client.take_frames() if f.seq > replayed.get(f.channel, 0)]
    merged = sorted(frames + queued, key=lambda f: f.seq)
    chunks = client.render(merged)
    counters.events_sent += len(merged)
    for channel, head in heads.items():
        positions.advance(channel, head)
    if replay.gaps:
        counters.resume_gaps += 1
        chunks.append(gap_frame(positions.text(), replay.gaps, client.last_event_id))
    else:
        chunks.append(wire.cursor_frame(positions.text()))
    return chunks


def gap_frame(event_id: str, gaps: Collection[str], last_event_id: str) -> bytes:
    """The ``gap`` event: which channels history no longer covers from the cursor."""
    data = {
        "channels": sorted(c for c in gaps if not is_internal(c)),
        "all": ALL_CHANNEL in gaps,
        "last_event_id": last_event_id,
    }
    return wire.frame(event_id, wire.frame_payload(GAP_EVENT.encode(), wire.encode_data(data)))


__all__: list[str] = []  # internal: the service's streams use it
