"""The floor of the Redis publish burst: the library's own publish script sent from a
bare redis-py pipeline, in its own process, with every argument built before the
clock starts. It does the same Redis work per event as the library (the same script,
batch cut, channels and payload sizes), without the library's Python around it.

Usage: ``python -m bench.redis_floor '<json spec>'``; prints events/s.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from typing import Any

import redis

from fastapi_sse._wire import frame_payload
from fastapi_sse.backends._redis_keys import Keys
from fastapi_sse.backends._redis_scripts import PUBLISH, PublishCalls, chunks

# The backend's private parts on purpose: the floor must run exactly its script with
# exactly its arguments.
from fastapi_sse.backends.base import Publication

ROUND_TRIP = 5000
"""Events per round trip, as the outbox sends them."""


def floor_rate(spec: dict[str, Any]) -> float:
    users, events, start, pad = spec["users"], spec["events"], spec["start"], "x" * spec["size"]
    # The script's arguments (keys, tokens, packed events) as the backend builds them
    # with its default history settings.
    builder = PublishCalls(
        Keys(spec["redis_prefix"]), history_size=1000, history_ttl_ms=3_600_000, id_index_size=100_000,
        token_ttl_ms=3_600_000,
    )  # fmt: skip
    tokens = uuid.uuid4().hex[:12] + ":"
    data = [json.dumps({"t": 0.0, "i": start + k, "p": pad}, separators=(",", ":")) for k in range(events)]
    batch = [Publication(f"user:{k % users}", frame_payload(b"bench", d), None, True) for k, d in enumerate(data)]
    trips = [
        [builder.call(chunk, tokens) for chunk in chunks(batch[i : i + ROUND_TRIP])]
        for i in range(0, events, ROUND_TRIP)
    ]
    client = redis.Redis.from_url(spec["redis_url"])
    try:
        sha = client.script_load(PUBLISH)
        started = time.perf_counter()
        for calls in trips:
            with client.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    pipe.evalsha(sha, len(keys), *keys, *args)
                pipe.execute()
        return events / (time.perf_counter() - started)
    finally:
        client.close()


if __name__ == "__main__":
    print(json.dumps(floor_rate(json.loads(sys.argv[1]))))
