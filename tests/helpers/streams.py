"""Real SSE clients for tests: httpx + httpx-sse for parsed events, raw sockets for bytes."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx
from httpx_sse import EventSource, ServerSentEvent

READ_TIMEOUT = 5.0


def dispatched(sse: ServerSentEvent) -> bool:
    """Whether a browser would fire this frame as an event (frames without data do not)."""
    return sse.data != "" or sse.event != "message"


class Stream:
    """One open event stream, parsed by httpx-sse as a client would parse it.

    ``frames`` keeps every frame seen (retry hint and id-only cursors included);
    the ``next_*`` methods return only frames a browser dispatches.
    """

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.frames: list[ServerSentEvent] = []
        self.ended = False
        self._iter = EventSource(response).iter_sse()

    @property
    def last_event_id(self) -> str:
        """The client's cursor: what it would send as ``Last-Event-ID`` on reconnect."""
        return self.frames[-1].id if self.frames else ""

    @property
    def retry(self) -> int | None:
        return next((f.retry for f in self.frames if f.retry is not None), None)

    def next_frame(self) -> ServerSentEvent:
        try:
            frame = next(self._iter)
        except StopIteration:
            self.ended = True
            raise AssertionError("the stream ended") from None
        self.frames.append(frame)
        return frame

    def next_event(self) -> ServerSentEvent:
        while True:
            frame = self.next_frame()
            if dispatched(frame):
                return frame

    def events(self, count: int) -> list[ServerSentEvent]:
        return [self.next_event() for _ in range(count)]

    def until(self, predicate: Callable[[ServerSentEvent], bool]) -> list[ServerSentEvent]:
        """Every dispatched event up to and including the first that matches."""
        seen = []
        while True:
            event = self.next_event()
            seen.append(event)
            if predicate(event):
                return seen

    def until_event(self, name: str) -> list[ServerSentEvent]:
        return self.until(lambda e: e.event == name)

    def rest(self) -> list[ServerSentEvent]:
        """Every dispatched event until the server ends the stream."""
        out = []
        for frame in self._iter:
            self.frames.append(frame)
            if dispatched(frame):
                out.append(frame)
        self.ended = True
        return out


@contextmanager
def open_stream(
    url: str,
    *,
    params: Any = None,
    headers: Mapping[str, str] | None = None,
    opened: bool = True,
) -> Iterator[Stream]:
    """Connect like a browser's EventSource; fails instead of hanging when nothing arrives."""
    timeout = httpx.Timeout(10.0, read=READ_TIMEOUT)
    with (
        httpx.Client(timeout=timeout) as client,
        client.stream(
            "GET", url, params=params, headers={"Accept": "text/event-stream", **(headers or {})}
        ) as response,
    ):
        assert response.status_code == 200, (response.status_code, response.read())
        stream = Stream(response)
        if opened:
            stream.next_frame()  # retry hint
            stream.next_frame()  # cursor (or the first replayed frame)
        yield stream


class RawResponse:
    """An HTTP/1.1 response read from a raw socket, its chunked body decoded byte for byte."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""
        self.body = b""
        self.eof = False
        self.complete = False
        head = self._read_until(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers: dict[str, str] = {}
        self.raw_headers = header_lines
        for line in header_lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.chunked = self.headers.get("transfer-encoding") == "chunked"

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self._buf += data
        return True

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buf:
            if not self._fill():
                raise AssertionError(f"connection closed before {marker!r}; got {self._buf!r}")
        head, _, self._buf = self._buf.partition(marker)
        return head

    def _read_exact(self, size: int) -> bytes:
        while len(self._buf) < size:
            if not self._fill():
                raise AssertionError("connection closed in the middle of a chunk")
        data, self._buf = self._buf[:size], self._buf[size:]
        return data

    def read_chunk(self) -> bool:
        """Decode one body chunk into ``body``; False at the end of the body."""
        if self.complete:
            return False
        if not self.chunked:
            if not self._buf and not self._fill():
                self.complete = True
                return False
            self.body += self._buf
            self._buf = b""
            return True
        size = int(self._read_until(b"\r\n").split(b";")[0], 16)
        if size == 0:
            self._read_until(b"\r\n")
            self.complete = True
            return False
        self.body += self._read_exact(size)
        self._read_exact(2)
        return True

    def read_until(self, marker: bytes) -> bytes:
        """Body bytes read so far, once they contain ``marker``."""
        while marker not in self.body:
            if not self.read_chunk():
                raise AssertionError(f"body ended before {marker!r}; got {self.body!r}")
        return self.body

    def read_to_end(self) -> bytes:
        """The whole body; the server must end it (a zero chunk or EOF)."""
        while self.read_chunk():
            pass
        return self.body


def raw_request(
    port: int,
    path: str,
    headers: Mapping[str, str | bytes] | None = None,
    *,
    rcvbuf: int | None = None,
    read_response: bool = True,
) -> tuple[socket.socket, RawResponse | None]:
    """Send ``GET path`` on a fresh socket; returns the socket and its parsed response head."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(READ_TIMEOUT)
    sock.connect(("127.0.0.1", port))
    lines = [f"GET {path} HTTP/1.1".encode(), f"Host: 127.0.0.1:{port}".encode(), b"Accept: text/event-stream"]
    # Text values go out as UTF-8, as a browser sends Last-Event-ID; bytes as given.
    lines += [k.encode() + b": " + (v if isinstance(v, bytes) else v.encode()) for k, v in (headers or {}).items()]
    sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
    return sock, (RawResponse(sock) if read_response else None)


@contextmanager
def raw_stream(port: int, path: str, headers: Mapping[str, str | bytes] | None = None) -> Iterator[RawResponse]:
    sock, response = raw_request(port, path, headers)
    assert response is not None
    try:
        yield response
    finally:
        sock.close()


def wait_until(condition: Callable[[], Any], timeout: float = 5.0, message: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(0.005)


def parse(body: bytes) -> list[ServerSentEvent]:
    """The events a client dispatches from these bytes; an unfinished last event is dropped."""
    from httpx_sse._decoders import SSEDecoder, SSELineDecoder

    lines = SSELineDecoder().decode(body.decode())
    decoder = SSEDecoder()
    frames = [frame for line in lines if (frame := decoder.decode(line)) is not None]
    return [frame for frame in frames if dispatched(frame)]


def dechunk(data: bytes) -> bytes:
    """Decode a chunked HTTP body, or the prefix of one (the last chunk may be cut short)."""
    out = b""
    while data:
        size_line, sep, rest = data.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


class RawReader(threading.Thread):
    """Drains a raw socket in the background until ``marker`` arrives or the server closes it."""

    def __init__(self, sock: socket.socket, marker: bytes | None) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.marker = marker
        self.data = b""
        self.eof = False

    def run(self) -> None:
        while self.marker is None or self.marker not in self.data[-65536:]:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                self.eof = True
                break
            self.data += chunk


def soft_refusal(response: httpx.Response) -> str:
    """Assert that ``response`` refuses a stream the way that keeps a browser's EventSource
    coming back (a 200 stream with a ``retry:`` delay, then its end); return the reason."""
    assert response.status_code == 200, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert retry_of(response) >= 0, response.content
    comment = next(line for line in response.text.splitlines() if line.startswith(": refused: "))
    return comment.removeprefix(": refused: ")


def retry_of(response: httpx.Response) -> int:
    """The ``retry:`` delay, in milliseconds, that a refused stream's body opens with."""
    first = response.text.split("\n", 1)[0]
    assert first.startswith("retry: ") and first.removeprefix("retry: ").isdigit(), response.text
    return int(first.removeprefix("retry: "))
