"""Ids come back exactly through a real EventSource client's own reconnects
(the npm ``eventsource`` package, run by node; tests/js/resume.mjs)."""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from conftest import ROOT
from helpers.apps import fast_settings, router_app, served

JS = ROOT / "tests" / "js"
WAIT = 10.0

ASCII_IDS = ["msg-1", "!#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "a b  c", "x" * 128]
LATIN1_IDS = ["évt-1", "ÿ-ü é"]
WIDE_IDS = ["事件-2", "🎉-3 🚀", "事" * 127 + "!"]


class NodeClient:
    """The node script's records, read as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.records: list[dict[str, Any]] = []
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(json.loads(line))
        self._lines.put(None)

    def expect(self, kind: str) -> dict[str, Any]:
        """The next record of this kind (the ones before it are kept in ``records``)."""
        deadline = time.monotonic() + WAIT
        while True:
            try:
                record = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no {kind!r} from the EventSource client within {WAIT}s: {self.records}"
                ) from None
            if record is None:
                assert self.proc.stderr is not None
                raise AssertionError(f"the EventSource client exited: {self.proc.stderr.read()}")
            self.records.append(record)
            if record["type"] == kind:
                return record

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["type"] == kind]

    def close(self) -> None:
        """Close stdin (the script then exits), and wait for it and its output."""
        proc = self.proc
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.close()
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)
        self._reader.join(WAIT)
        proc.stdout.close()
        proc.stderr.close()


@contextmanager
def eventsource(url: str, mode: str) -> Iterator[NodeClient]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: this test drives a real EventSource client; install Node.js 20 or newer")
    if not (JS / "node_modules" / "eventsource").is_dir():
        pytest.fail("the npm eventsource package is not installed: run 'make js-deps' (npm ci --prefix tests/js)")
    proc = subprocess.Popen(
        [node, str(JS / "resume.mjs"), url, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
    )
    client = NodeClient(proc)
    try:
        yield client
    finally:
        client.close()


@pytest.mark.parametrize(
    ("mode", "ids"),
    [("browser", ASCII_IDS + LATIN1_IDS + WIDE_IDS), ("package", ASCII_IDS + LATIN1_IDS)],
)
def test_every_kind_of_accepted_id_resumes_exactly_through_eventsource_reconnects(mode: str, ids: list[str]) -> None:
    channel = f"js-{mode}"
    with (
        served(router_app(fast_settings(retry_interval=0.05))) as (srv, sse),
        eventsource(f"{srv.url}/subscribe?channel={channel}", mode) as client,
    ):
        client.expect("open")
        sent = [(ids[0], {"n": 0})]
        srv.call(sse.publish, channel, "e", {"n": 0}, ids[0])
        assert client.expect("e")["id"] == ids[0]

        for n, event_id in enumerate([*ids[1:], None], start=1):

            async def end_stream_then_publish(n: int = n, event_id: str | None = event_id) -> list[tuple[str, Any]]:
                # One turn of the server's loop: the client gets these only by resuming.
                (connected,) = sse.get_clients_by_channel(channel)
                sse.remove_client(connected.id)
                between = await sse.publish(channel, "e", {"n": n, "between": True})
                own = await sse.publish(channel, "e", {"n": n}, event_id)
                return [(between, {"n": n, "between": True}), (own, {"n": n})]

            resumed_from = sent[-1][0]
            sent += srv.call(end_stream_then_publish)
            request = client.expect("request")
            client.expect("open")
            client.expect("e")
            client.expect("e")
            # The client sent back exactly the id it last saw, and the server knew it.
            assert request["lastEventId"] == resumed_from

        srv.call(sse.publish, channel, "e", {"n": "live"}, "last-live")
        client.expect("e")

    received = [(r["id"], json.loads(r["data"])) for r in client.of("e")]
    assert received == [*sent, ("last-live", {"n": "live"})]
    assert client.of("gap") == []
    assert len(client.of("open")) == len(ids) + 1
    # Every error is the end of a stream followed by a reconnect, never a refusal.
    assert all(r["readyState"] == 0 for r in client.of("error"))
