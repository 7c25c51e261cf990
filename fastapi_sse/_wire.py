"""The SSE wire format (WHATWG HTML, "Server-sent events"): validation and framing.

Every function here is pure; the service calls them once per event, never per client.
"""

from __future__ import annotations

import json
import re
from typing import Any, NoReturn

import pydantic_core

from fastapi_sse.errors import InvalidEventError

# A client ends a line at CRLF, a lone CR or a lone LF, and at nothing else.
_LINE_END = re.compile(r"\r\n|\r|\n")
_FIELD_BREAK = re.compile(r"[\r\n]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]+")

# Names a browser's EventSource dispatches itself: an event called "error" would
# land in connection-error handlers, one called "open" in connection-open ones.
RESERVED_EVENT_NAMES = frozenset({"error", "open"})

PING = b": ping\n\n"


class Text(str):
    """Wrap a string to send it as the event's data verbatim instead of as JSON.

    ``sse.broadcast("logs", "line", Text("plain\\ntext"))`` reaches the browser as
    ``event.data == "plain\\ntext"``; any other value is JSON-encoded.
    """

    __slots__ = ()


_CHECKED_NAMES: dict[str, bytes] = {}
"""Event names already validated, encoded (an app uses a few names for every event)."""
_CHECKED_NAMES_MAX = 1024


def check_event_name(event: str) -> bytes:
    """Validate an event name and return it encoded."""
    exact = type(event) is str  # a str subclass (an enum) may hash differently: not kept
    if exact and (encoded := _CHECKED_NAMES.get(event)) is not None:
        return encoded
    encoded = _check_event_name(event)
    if exact and len(_CHECKED_NAMES) < _CHECKED_NAMES_MAX:
        _CHECKED_NAMES[event] = encoded
    return encoded


def _check_event_name(event: str) -> bytes:
    if not isinstance(event, str) or not event:
        raise InvalidEventError(f"event name must be a non-empty string, got {event!r}")
    if _FIELD_BREAK.search(event):
        raise InvalidEventError(f"event name {event!r} contains CR or LF, which would start a new field on the wire")
    if control := _CONTROL.search(event):
        raise InvalidEventError(f"event name {event!r} {_control_problem(control.group())}")
    if event in RESERVED_EVENT_NAMES:
        raise InvalidEventError(
            f"event name {event!r} is dispatched by browsers for connection state; choose another name"
        )
    return _utf8(event, "event name")


def check_event_id(event_id: str, max_length: int) -> str:
    """Validate an id given by the caller: accept only what comes back exactly as a
    ``Last-Event-ID`` header. Ids of digits alone are the service's own."""
    if not isinstance(event_id, str) or not event_id:
        raise InvalidEventError(
            f"event id must be a non-empty string (an empty id clears the browser's cursor), got {event_id!r}"
        )
    if problem := _id_problem(event_id, max_length):
        raise InvalidEventError(f"event id {problem}")
    if _DIGITS.fullmatch(event_id):
        raise InvalidEventError(
            f"event id {event_id!r} is only digits, which the service reserves for the ids it "
            "assigns; give yours a prefix such as 'msg-{event_id}'"
        )
    return event_id


def _id_problem(value: str, max_length: int) -> str | None:
    """Why an id cannot travel to the client and back as ``Last-Event-ID`` unchanged,
    or None. One rule for both ways, so that no id the service sends is refused when
    a browser resumes from it (a 400 would end its reconnects for good)."""
    if len(value) > max_length:
        return (
            f"is {len(value)} characters, more than max_last_event_id_length={max_length}, "
            "so a client could never resume from it"
        )
    if control := _CONTROL.search(value):
        return f"{value!r} {_control_problem(control.group())}"
    if value != value.strip():
        return (
            f"{value!r} starts or ends with whitespace, which HTTP strips from the Last-Event-ID header "
            "(and a client drops one leading space of the field), so it would not come back as sent"
        )
    # Checked here, before the event is stored: the id is encoded only when framed.
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        return f"{value!r} is not valid UTF-8 text: {exc.reason}"
    return None


def _control_problem(char: str) -> str:
    return (
        f"contains the control character U+{ord(char):04X}: control characters (U+0000-U+001F, U+007F) "
        "are refused, as CR or LF would start a new field on the wire, a client ignores an id with NUL, "
        "and none comes back in a Last-Event-ID header"
    )


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise InvalidEventError(f"{what} {text!r} is not valid UTF-8 text: {exc.reason}") from None


def check_last_event_id(value: str, max_length: int) -> str:
    """Validate a ``Last-Event-ID`` from a request (untrusted input): it accepts what
    :func:`check_event_id` accepts, and the service's own ids (digits)."""
    if problem := _id_problem(value, max_length):
        raise ValueError(f"Last-Event-ID {problem}")
    return value


def encode_data(data: Any) -> str:
    """The event's data as text: JSON for any value, verbatim for :class:`Text`."""
    if isinstance(data, Text):
        return str(data)
    try:
        text = pydantic_core.to_json(data, inf_nan_mode="constants")
    except pydantic_core.PydanticSerializationError as exc:
        raise InvalidEventError(f"event data of type {type(data).__name__} cannot be encoded as JSON: {exc}") from None
    # NaN and the infinities come out as bare NaN/Infinity tokens, which are not JSON:
    # a browser's JSON.parse throws on them. Only text holding those words is parsed.
    if (b"NaN" in text or b"Infinity" in text) and _has_non_json_number(text):
        raise InvalidEventError(
            f"event data of type {type(data).__name__} holds NaN, Infinity or -Infinity, which JSON has no "
            "form for (a browser's JSON.parse throws on them); send null or a string instead"
        )
    return text.decode()


def _has_non_json_number(text: bytes) -> bool:
    try:
        json.loads(text, parse_constant=_refuse_constant)
    except _NonJSONNumber:
        return True
    return False


class _NonJSONNumber(Exception):
    pass


def _refuse_constant(token: str) -> NoReturn:
    raise _NonJSONNumber(token)


def frame_payload(event: bytes, text: str) -> bytes:
    """``event:`` and ``data:`` lines of one event, without its id and final blank line.

    The text is split at every line end a client recognises, one ``data:`` line per
    piece, so any string (a trailing newline included) arrives byte for byte.
    """
    try:
        if "\n" not in text and "\r" not in text:
            return b"event: " + event + b"\ndata: " + text.encode() + b"\n"
        lines = [b"event: ", event, b"\n"]
        for piece in _LINE_END.split(text):
            lines += (b"data: ", piece.encode(), b"\n")
    except UnicodeEncodeError as exc:
        raise InvalidEventError(f"event data is not valid UTF-8 text: {exc.reason}") from None
    return b"".join(lines)


def frame(event_id: str, payload: bytes) -> bytes:
    """A complete event: id line, payload and the blank line that dispatches it."""
    return b"id: " + event_id.encode() + b"\n" + payload + b"\n"


def cursor_frame(event_id: str) -> bytes:
    """An id-only frame: the client records the id and dispatches no event."""
    return b"id: " + event_id.encode() + b"\n\n"


def retry_frame(seconds: float) -> bytes:
    return b"retry: %d\n\n" % round(seconds * 1000)
