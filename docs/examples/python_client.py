import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
from httpx_sse import connect_sse


def follow(url: str, channel: str) -> Iterator[tuple[str, Any]]:
    """Yield (event, data) from a stream, reconnecting like a browser: after the
    server's retry delay, with Last-Event-ID set to the last id seen."""
    last_event_id = ""
    retry = 3.0
    # A read timeout longer than the server's heartbeat interval (30 s by default).
    with httpx.Client(timeout=httpx.Timeout(10.0, read=60.0)) as client:
        while True:
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            try:
                with connect_sse(client, "GET", url, params={"channel": channel}, headers=headers) as source:
                    source.response.raise_for_status()  # 4xx/5xx: a browser would not retry either
                    print(f"connected to {channel}", file=sys.stderr, flush=True)
                    for sse in source.iter_sse():
                        if sse.id:
                            last_event_id = sse.id
                        if sse.retry is not None:
                            retry = sse.retry / 1000
                        if sse.event == "message" and sse.data == "":
                            # The retry: hint and the id-only cursor frame: no event.
                            # (Heartbeats are ": ping" comments, which httpx-sse skips.)
                            continue
                        yield sse.event, json.loads(sse.data)
            except httpx.TransportError:
                pass  # the connection dropped: reconnect below
            time.sleep(retry)


if __name__ == "__main__":
    for event, data in follow(sys.argv[1], sys.argv[2]):
        print(event, data, flush=True)
