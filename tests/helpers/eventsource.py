"""A real EventSource client for tests: the npm ``eventsource`` package, run by node
(tests/js/resume.mjs), its records read as they come."""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
JS = ROOT / "tests" / "js"
WAIT = 10.0


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
