"""SSE-WIRE.md rules 1-17, checked on the bytes a real server sends and on what a real client parses."""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from datetime import UTC, date, datetime
from typing import Any

import pytest
from fastapi.middleware.gzip import GZipMiddleware
from helpers.apps import fast_settings, router_app, served
from helpers.streams import open_stream, parse, raw_stream
from pydantic import BaseModel

from fastapi_sse import InvalidEventError, Text
from fastapi_sse._wire import (
    check_event_id,
    check_event_name,
    check_last_event_id,
    encode_data,
    frame,
    frame_payload,
    retry_frame,
)

FIELD_LINE = re.compile(rb"(id|event|data|retry): [^\r\n]*|: ping|")


@pytest.fixture(scope="module")
def server() -> Any:
    with served(router_app(fast_settings(retry_interval=0.25))) as pair:
        yield pair


def test_stream_opens_with_retry_hint_and_id_only_cursor(server: Any) -> None:
    srv, sse = server
    srv.call(sse.broadcast, "elsewhere", "tick", 1)
    head = srv.call(sse.backend.head)
    with raw_stream(srv.port, "/subscribe?channel=w") as raw:
        body = raw.read_until(b"\n\n" + b"id: ")
        body = raw.read_until(f"id: {head}\n\n".encode())
    # Rule 7: digits only, from retry_interval; rule 10: the cursor is a frame without data.
    assert body == f"retry: 250\n\nid: {head}\n\n".encode()


def test_no_byte_order_mark_and_utf8(server: Any) -> None:
    srv, sse = server
    with raw_stream(srv.port, "/subscribe?channel=utf") as raw:
        raw.read_until(b"\n\nid: ")
        srv.call(sse.broadcast, "utf", "greet", Text("héllo wörld ✓ 😀"))
        body = raw.read_until("😀\n\n".encode())
    assert not body.startswith(b"\xef\xbb\xbf")
    assert b"\xef\xbb\xbf" not in body
    assert "data: héllo wörld ✓ 😀\n".encode() in body
    assert raw.headers["content-type"].startswith("text/event-stream")


SPLIT_PAYLOAD = "a\rb\nc\r\nd\ve\ff\x1cg\x1dh\x1ei\x85j\u2028k\u2029l"


def test_data_split_on_cr_lf_crlf_only(server: Any) -> None:
    srv, sse = server
    with raw_stream(srv.port, "/subscribe?channel=split") as raw:
        raw.read_until(b"\n\nid: ")
        srv.call(sse.broadcast, "split", "lines", Text(SPLIT_PAYLOAD), "split-1")
        body = raw.read_until(b"l\n\n")
    event = body[body.index(b"id: split-1") :]
    expected_rest = "d\ve\ff\x1cg\x1dh\x1ei\x85j\u2028k\u2029l".encode()
    assert event == b"id: split-1\nevent: lines\ndata: a\ndata: b\ndata: c\ndata: " + expected_rest + b"\n\n"

    with open_stream(srv.url + "/subscribe", params={"channel": "split"}) as stream:
        srv.call(sse.broadcast, "split", "lines", Text(SPLIT_PAYLOAD))
        got = stream.next_event()
    # A client turns each line end into LF and leaves the other separators in the data.
    assert got.data == "a\nb\nc\nd\ve\ff\x1cg\x1dh\x1ei\x85j\u2028k\u2029l"


@pytest.mark.parametrize(
    "text",
    ["line\n", "two\r\n", "cr\r", "\n", "\n\nmiddle\n\n", " leading space", "  two spaces", "", "x:y: z"],
)
def test_verbatim_text_reaches_client_unchanged_except_line_ends(server: Any, text: str) -> None:
    srv, sse = server
    with open_stream(srv.url + "/subscribe", params={"channel": "verbatim"}) as stream:
        srv.call(sse.broadcast, "verbatim", "text", Text(text))
        got = stream.next_event()
    assert got.event == "text"
    assert got.data == text.replace("\r\n", "\n").replace("\r", "\n")


def test_trailing_newline_gets_its_own_empty_data_line(server: Any) -> None:
    srv, sse = server
    with raw_stream(srv.port, "/subscribe?channel=trail") as raw:
        raw.read_until(b"\n\nid: ")
        srv.call(sse.broadcast, "trail", "t", Text("line\n"), "trail-1")
        body = raw.read_until(b"data: \n\n")
    assert body.endswith(b"id: trail-1\nevent: t\ndata: line\ndata: \n\n")


def test_leading_space_kept_by_writing_one_space_after_colon(server: Any) -> None:
    srv, sse = server
    with raw_stream(srv.port, "/subscribe?channel=lead") as raw:
        raw.read_until(b"\n\nid: ")
        srv.call(sse.broadcast, "lead", "t", Text(" indented"), "lead-1")
        body = raw.read_until(b"indented\n\n")
    assert body.endswith(b"id: lead-1\nevent: t\ndata:  indented\n\n")


def test_every_line_is_a_field_with_one_space_and_events_end_with_blank_line(server: Any) -> None:
    srv, sse = server
    with raw_stream(srv.port, "/subscribe?channel=fmt") as raw:
        raw.read_until(b"\n\nid: ")
        srv.call(sse.broadcast, "fmt", "one", {"multi": "line\nin json"})
        srv.call(sse.broadcast, "fmt", "two", Text("x\ny"), "fmt-2")
        srv.call(sse.broadcast_all, "three", [1, 2])
        body = raw.read_until(b"[1,2]\n\n")
    assert body.endswith(b"\n\n")
    for line in body.split(b"\n")[:-1]:
        assert FIELD_LINE.fullmatch(line), line
        # Rule 9: an empty id would clear the client's cursor.
        assert line != b"id: "
    blocks = body.rstrip(b"\n").split(b"\n\n")
    events = [b for b in blocks if b"\ndata: " in b]
    assert len(events) == 3
    # JSON escapes newlines inside strings: one data line.
    assert events[0].count(b"data: ") == 1
    for block in events:
        assert block.startswith(b"id: ")
        assert re.match(rb"id: [^\n]+\nevent: [^\n]+\ndata: ", block)


def test_every_event_has_an_id_and_service_ids_increase_across_channels(server: Any) -> None:
    srv, sse = server
    with open_stream(srv.url + "/subscribe", params={"channel": ["inc-a", "inc-b"]}) as stream:
        srv.call(sse.broadcast, "inc-a", "e", 1)
        srv.call(sse.broadcast, "inc-b", "e", 2)
        srv.call(sse.broadcast, "inc-a", "e", 3, "own-id")
        srv.call(sse.broadcast_all, "e", 4)
        got = stream.events(4)
    assert [e.json() for e in got] == [1, 2, 3, 4]
    assert got[2].id == "own-id"
    numeric = [int(got[i].id) for i in (0, 1, 3)]
    assert numeric == sorted(numeric) and len(set(numeric)) == 3


@pytest.mark.parametrize(
    ("event", "event_id", "message"),
    [
        ("bad\nname", None, "CR or LF"),
        ("bad\rname", None, "CR or LF"),
        ("bad\r\nname", None, "CR or LF"),
        ("bad\0name", None, "control character U+0000"),
        ("bad\x1bname", None, "control characters (U+0000-U+001F, U+007F)"),
        ("error", None, "dispatched by browsers"),
        ("open", None, "dispatched by browsers"),
        ("", None, "non-empty"),
        ("ok", "id\ndata: injected", "control character U+000A"),
        ("ok", "id\rretry: 1", "control character U+000D"),
        ("ok", "nul\0id", "control character U+0000"),
        ("ok", "tab\tid", "control character U+0009"),
        ("ok", "del\x7fid", "control character U+007F"),
        ("ok", " lead", "starts or ends with whitespace"),
        ("ok", "trail ", "starts or ends with whitespace"),
        ("ok", "", "non-empty"),
        ("ok", "12345", "only digits"),
        ("ok", "x" * 129, "max_last_event_id_length"),
        ("bad\ud800", None, "not valid UTF-8"),
        ("ok", "id-\udfff", "not valid UTF-8"),
    ],
)
def test_unsafe_event_names_and_ids_rejected_before_anything_is_sent(
    server: Any, event: str, event_id: str | None, message: str
) -> None:
    srv, sse = server
    with open_stream(srv.url + "/subscribe", params={"channel": "inject"}) as stream:
        client_id = srv.call(lambda: sse.get_clients_by_channel("inject")[0].id)
        published = sse.stats().events_published
        attempts: list[Any] = [
            lambda: sse.broadcast("inject", event, {"v": 1}, event_id),
            lambda: sse.broadcast_all(event, {"v": 1}, event_id),
            lambda: sse.send_to(client_id, event, {"v": 1}, event_id),
            lambda: srv.call(sse.publish, "inject", event, {"v": 1}, event_id),
            lambda: srv.call(sse.publish_all, event, {"v": 1}, event_id),
            lambda: srv.call(sse.publish_to, client_id, event, {"v": 1}, event_id),
            # From the server's own loop too, as an async handler would call it.
            lambda: srv.call(sse.broadcast, "inject", event, {"v": 1}, event_id),
        ]
        for attempt in attempts:
            with pytest.raises(InvalidEventError, match=re.escape(message)):
                attempt()
        assert sse.stats().events_published == published
        srv.call(sse.broadcast, "inject", "sentinel", "after")
        assert stream.next_event().event == "sentinel"


def test_event_names_past_the_checked_names_cache_are_checked_and_sent(server: Any) -> None:
    # Checked names are remembered up to a bound: names past it are checked every time.
    srv, sse = server
    names = [f"kind-{n}" for n in range(1100)]
    with open_stream(srv.url + "/subscribe", params={"channel": "many"}) as stream:
        for start in range(0, len(names), 100):  # within the stream's buffer
            batch = names[start : start + 100]
            srv.call(lambda batch=batch: [sse.broadcast("many", name, 1) for name in batch])
            assert [stream.next_event().event for _ in batch] == batch
        for bad in ("kind-\n1100", "open", "bad\ud800"):
            with pytest.raises(InvalidEventError):
                sse.broadcast("many", bad, 1)
        srv.call(sse.broadcast, "many", names[-1], "again")
        last = stream.next_event()
        assert (last.event, last.data) == (names[-1], '"again"')


def test_message_event_name_is_allowed(server: Any) -> None:
    srv, sse = server
    with open_stream(srv.url + "/subscribe", params={"channel": "msg"}) as stream:
        srv.call(sse.broadcast, "msg", "message", {"plain": True})
        got = stream.next_event()
    assert (got.event, got.json()) == ("message", {"plain": True})


def test_heartbeat_is_a_comment_that_reaches_no_client_event() -> None:
    with (
        served(router_app(fast_settings(heartbeat_interval=0.1))) as (srv, sse),
        raw_stream(srv.port, "/subscribe?channel=hb") as raw,
    ):
        body = raw.read_until(b": ping\n\n: ping\n\n")
        srv.call(sse.broadcast, "hb", "after", 1)
        body = raw.read_until(b"event: after\ndata: 1\n\n")
    assert body.startswith(b"retry: 500\n\nid: 0\n\n: ping\n\n: ping\n\n")
    # What a client's parser makes of those bytes: the pings fire nothing.
    events = parse(body)
    assert [(e.event, e.data, e.id) for e in events] == [("after", "1", "1")]


def test_stream_headers(server: Any) -> None:
    srv, _ = server
    with raw_stream(srv.port, "/subscribe?channel=h") as raw:
        assert raw.status == 200
        assert raw.headers["content-type"].split(";")[0] == "text/event-stream"
        assert raw.headers["cache-control"] == "no-store"
        assert raw.headers["x-accel-buffering"] == "no"
        assert "content-length" not in raw.headers


def test_gzip_middleware_does_not_compress_or_buffer_the_stream() -> None:
    app = router_app()
    app.add_middleware(GZipMiddleware, minimum_size=1)

    @app.get("/plain")
    def plain() -> dict[str, str]:
        return {"text": "compress me " * 100}

    with served(app) as (srv, sse):
        with raw_stream(srv.port, "/plain", {"Accept-Encoding": "gzip"}) as raw:
            assert raw.headers.get("content-encoding") == "gzip"  # the middleware works
        with raw_stream(srv.port, "/subscribe?channel=gz", {"Accept-Encoding": "gzip"}) as raw:
            assert "content-encoding" not in raw.headers
            raw.read_until(b"\n\nid: ")
            srv.call(sse.broadcast, "gz", "small", Text("x"))
            # Arrives on its own, not held back until a compression buffer fills.
            assert raw.read_until(b"event: small\ndata: x\n\n")


class Item(BaseModel):
    name: str
    when: datetime


@dataclasses.dataclass
class Point:
    x: int
    y: float
    tags: list[str]


def test_json_of_models_dataclasses_datetimes(server: Any) -> None:
    srv, sse = server
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    ident = uuid.UUID(int=7)
    with open_stream(srv.url + "/subscribe", params={"channel": "json"}) as stream:
        srv.call(sse.broadcast, "json", "model", Item(name="n", when=when))
        srv.call(sse.broadcast, "json", "dc", Point(1, 2.5, ["a"]))
        srv.call(sse.broadcast, "json", "misc", {"at": when, "day": date(2026, 1, 2), "uuid": ident, "none": None})
        srv.call(sse.broadcast, "json", "unicode", {"s": "é\u2028"})
        got = stream.events(4)
    assert got[0].json() == {"name": "n", "when": "2026-01-02T03:04:05Z"}
    assert got[1].json() == {"x": 1, "y": 2.5, "tags": ["a"]}
    assert got[2].json() == {"at": "2026-01-02T03:04:05Z", "day": "2026-01-02", "uuid": str(ident), "none": None}
    assert got[3].json() == {"s": "é\u2028"}


def test_unencodable_data_is_rejected(server: Any) -> None:
    _, sse = server
    with pytest.raises(InvalidEventError, match="cannot be encoded as JSON"):
        sse.broadcast("json", "bad", object())


def test_event_size_limit() -> None:
    with (
        served(router_app(fast_settings(max_event_bytes=2000))) as (srv, sse),
        open_stream(srv.url + "/subscribe", params={"channel": "big"}) as stream,
    ):
        with pytest.raises(InvalidEventError, match="max_event_bytes=2000"):
            sse.broadcast("big", "e", Text("x" * 2000))
        with pytest.raises(InvalidEventError, match="max_event_bytes"):
            srv.call(sse.publish_all, "e", "y" * 3000)
        srv.call(sse.broadcast, "big", "e", Text("z" * 1900))
        assert stream.next_event().data == "z" * 1900


def test_framing_functions_are_pure_and_exact() -> None:
    assert frame("7", frame_payload(b"e", "a\r\nb")) == b"id: 7\nevent: e\ndata: a\ndata: b\n\n"
    assert retry_frame(1.5) == b"retry: 1500\n\n"
    assert check_last_event_id("abc", 10) == "abc"
    with pytest.raises(ValueError, match="control characters"):
        check_last_event_id("a\tb", 10)


def test_text_that_is_not_utf8_is_rejected_and_history_stays_resumable(server: Any) -> None:
    # Regression: an id with a lone surrogate passed validation, was stored, and then
    # failed to encode when framed, for live clients and for every later resume.
    srv, sse = server
    with open_stream(srv.url + "/subscribe", params={"channel": "surrogate"}) as stream:
        cursor = srv.call(sse.publish, "surrogate", "e", "before")
        assert stream.next_event().json() == "before"
        with pytest.raises(InvalidEventError, match="not valid UTF-8"):
            srv.call(sse.broadcast, "surrogate", "e", 1, "id-\ud800")
        with pytest.raises(InvalidEventError, match="not valid UTF-8"):
            srv.call(sse.broadcast, "surrogate", "e", Text("lone \udc80"))
        with pytest.raises(InvalidEventError, match="cannot be encoded as JSON"):
            srv.call(sse.broadcast, "surrogate", "e", {"s": "\ud800"})
        srv.call(sse.broadcast, "surrogate", "e", "after")
        assert stream.next_event().json() == "after"
    with open_stream(
        srv.url + "/subscribe", params={"channel": "surrogate"}, headers={"Last-Event-ID": cursor}, opened=False
    ) as resumed:
        assert resumed.next_event().json() == "after"


# Ids a client sends back unchanged: punctuation, inner spaces, non-ASCII as UTF-8.
RETURNABLE_IDS = ["msg-1", "a b", "évt-1", "事件-2", "🎉-3", "x" * 128, "!#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "1.5"]


@pytest.mark.parametrize("event_id", RETURNABLE_IDS)
def test_ids_that_come_back_are_accepted_both_ways(event_id: str) -> None:
    assert check_event_id(event_id, 128) == event_id
    assert check_last_event_id(event_id, 128) == event_id


@pytest.mark.parametrize(
    ("event_id", "rule"),
    [
        ("x" * 129, "more than max_last_event_id_length=128"),
        *[(f"a{chr(c)}b", f"control character U+{c:04X}") for c in [*range(0x20), 0x7F]],
        (" a", "starts or ends with whitespace"),
        ("a ", "starts or ends with whitespace"),
        ("a\u3000", "starts or ends with whitespace"),
        ("id-\ud800", "not valid UTF-8"),
    ],
)
def test_ids_that_cannot_come_back_are_refused_both_ways(event_id: str, rule: str) -> None:
    # One rule on both sides: the subscribe route never refuses (400, which ends a
    # browser's reconnects for good) an id that publishing accepted.
    with pytest.raises(InvalidEventError, match=re.escape(rule)):
        check_event_id(event_id, 128)
    with pytest.raises(ValueError, match=re.escape(rule)) as info:
        check_last_event_id(event_id, 128)
    assert not isinstance(info.value, InvalidEventError)


def test_digit_ids_are_the_services_own() -> None:
    with pytest.raises(InvalidEventError, match="only digits"):
        check_event_id("42", 128)
    assert check_last_event_id("42", 128) == "42"
    # Not digits: the Unicode digits a str.isdigit() would take.
    assert check_event_id("٤٢", 128) == "٤٢"


def test_every_single_character_id_is_accepted_by_publish_only_if_subscribe_accepts_it() -> None:
    for code in [*range(0x300), 0x2028, 0x3000, 0xFEFF, 0x1F389]:
        value = chr(code)
        try:
            check_event_id(value, 128)
        except InvalidEventError:
            continue
        assert check_last_event_id(value, 128) == value


@pytest.mark.parametrize("name", ["n\0", "n\x01", "n\t", "n\x1f", "n\x7f"])
def test_event_names_refuse_control_characters(name: str) -> None:
    with pytest.raises(InvalidEventError, match=re.escape("control characters (U+0000-U+001F, U+007F)")):
        check_event_name(name)
    assert check_event_name("évt name") == "évt name".encode()


NAN = float("nan")
INF = float("inf")


@dataclasses.dataclass
class Reading:
    value: float


@pytest.mark.parametrize(
    "data", [NAN, INF, -INF, [1, NAN], {"a": {"b": [INF]}}, {"deep": [{"x": -INF}]}, Reading(NAN), (1, {"t": NAN})]
)
def test_data_that_is_not_json_is_refused(data: Any) -> None:
    with pytest.raises(InvalidEventError, match="holds NaN, Infinity or -Infinity"):
        encode_data(data)


def test_the_words_nan_and_infinity_inside_json_are_fine() -> None:
    assert encode_data({"NaN": "Infinity", "s": "-Infinity NaN"}) == '{"NaN":"Infinity","s":"-Infinity NaN"}'
    # Large numbers are fine too (their exact spelling, -2e300 or -2e+300, varies by pydantic version).
    assert json.loads(encode_data([1.5, -2e300, 0.0])) == [1.5, -2e300, 0.0]
    assert encode_data(Text("NaN")) == "NaN"


def test_nan_is_refused_by_every_publishing_call_and_nothing_is_sent(server: Any) -> None:
    srv, sse = server
    with open_stream(srv.url + "/subscribe", params={"channel": "nan"}) as stream:
        client_id = srv.call(lambda: sse.get_clients_by_channel("nan")[0].id)
        published = sse.stats().events_published
        attempts: list[Any] = [
            lambda: sse.broadcast("nan", "e", {"v": NAN}),
            lambda: sse.broadcast_all("e", [INF]),
            lambda: sse.send_to(client_id, "e", -INF),
            lambda: srv.call(sse.publish, "nan", "e", {"nested": [{"v": NAN}]}),
            lambda: srv.call(sse.publish_all, "e", NAN),
            lambda: srv.call(sse.publish_to, client_id, "e", Reading(INF)),
        ]
        for attempt in attempts:
            with pytest.raises(InvalidEventError, match="NaN, Infinity or -Infinity"):
                attempt()
        assert sse.stats().events_published == published
        srv.call(sse.broadcast, "nan", "sentinel", {"v": None})
        got = stream.next_event()
    assert (got.event, got.json()) == ("sentinel", {"v": None})
