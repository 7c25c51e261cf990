"""Typed events: declare an event's data as a pydantic model, and every publish of it
is validated; the stream routes document it in OpenAPI, and an AsyncAPI 3 document
describes every declared event and the channels it appears on."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any, TypeVar, Union

from pydantic import BaseModel, ValidationError, WithJsonSchema
from pydantic.json_schema import models_json_schema

from fastapi_sse import _wire as wire
from fastapi_sse.errors import InvalidEventError

ModelT = TypeVar("ModelT", bound=type[BaseModel])

OPENAPI_REF = "#/components/schemas/{model}"
# A channel pattern's placeholders: ``user:{user_id}`` matches ``user:42``.
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_KEY = re.compile(r"[^A-Za-z0-9_.\-]+")

# A frame of the stream as FastAPI's own fastapi.sse documents it (OpenAPI 3.2, 4.14.4).
_FRAME_PROPERTIES: dict[str, Any] = {
    "data": {"type": "string"},
    "event": {"type": "string"},
    "id": {"type": "string"},
    "retry": {"type": "integer", "minimum": 0},
}


@dataclass(frozen=True)
class EventType:
    """One declared event: its name, the model of its data, the channel patterns it
    appears on (documentation only) and a description."""

    name: str
    model: type[BaseModel]
    channels: tuple[str, ...] = ()
    description: str | None = None

    def encode(self, data: Any) -> str:
        """``data`` validated against the model and serialised as pydantic's JSON (by
        alias, as FastAPI serialises responses); raises :class:`InvalidEventError`."""
        model = self.model
        if not isinstance(data, model):
            if isinstance(data, BaseModel):
                raise InvalidEventError(
                    f"event {self.name!r} is declared with data of type {model.__name__}, "
                    f"got an instance of {type(data).__name__}"
                )
            try:
                data = model.model_validate(data)
            except ValidationError as exc:
                raise InvalidEventError(
                    f"event {self.name!r} data does not fit {model.__name__}: {condense(exc)}"
                ) from None
        try:
            return model.__pydantic_serializer__.to_json(data, by_alias=True).decode()
        except ValueError as exc:  # PydanticSerializationError
            raise InvalidEventError(f"event {self.name!r} data cannot be serialised as JSON: {exc}") from None


def condense(error: ValidationError) -> str:
    """Pydantic's errors on one line: ``title: Field required; count: Input should be ...``."""
    parts = []
    for item in error.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in item["loc"])
        parts.append(f"{where}: {item['msg']}" if where else item["msg"])
    return "; ".join(parts)


def placeholders(pattern: str) -> list[str]:
    """The ``{param}`` names of a channel pattern, in order."""
    return _PLACEHOLDER.findall(pattern)


def _check_pattern(pattern: str) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"a channel pattern must be a non-empty string, got {pattern!r}")
    if "{" in _PLACEHOLDER.sub("", pattern) or "}" in _PLACEHOLDER.sub("", pattern):
        raise ValueError(
            f"channel pattern {pattern!r} has a brace that is not a placeholder: write placeholders as "
            "{name} (letters, digits, underscores), e.g. 'user:{user_id}'"
        )
    return pattern


class EventTypes:
    """A registry of typed events: the model of each declared event's data.

    ``events = EventTypes()``, then ``events.declare("notification", Notification,
    channels="user:{user_id}")`` or ``@events.event("notification", channels=...)``
    on the model class. Give it to :func:`create_sse_router` (``events=events``),
    :func:`sse_lifespan` or :class:`SSEService`: every publishing method then
    validates the data of a declared event (a dict, or an instance of the model)
    and raises :class:`InvalidEventError` when it does not fit. Events not declared
    are sent as before.

    ``channels`` documents where an event appears: a pattern per channel, where
    ``{name}`` stands for one varying part (``user:{user_id}``, ``doc:{doc_id}``),
    as in AsyncAPI channel addresses. It is not enforced on publish.
    """

    def __init__(self) -> None:
        self._by_name: dict[str, EventType] = {}
        self._types = MappingProxyType(self._by_name)

    @property
    def types(self) -> Mapping[str, EventType]:
        """The declared events by name (a read-only view)."""
        return self._types

    def __iter__(self) -> Iterator[EventType]:
        return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __repr__(self) -> str:
        return f"EventTypes({', '.join(self._by_name)})"

    def declare(
        self,
        name: str,
        model: type[BaseModel],
        *,
        channels: str | Iterable[str] | None = None,
        description: str | None = None,
    ) -> EventType:
        """Declare that event ``name`` carries ``model`` as its data.

        Declaring a name again is allowed only with the same model, channels and
        description; anything else raises ``ValueError`` (a :class:`InvalidEventError`).
        """
        wire.check_event_name(name)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise InvalidEventError(f"event {name!r}: the model must be a pydantic BaseModel class, got {model!r}")
        patterns = (channels,) if isinstance(channels, str) else tuple(channels or ())
        declared = EventType(name, model, tuple(_check_pattern(p) for p in patterns), description)
        known = self._by_name.get(name)
        if known is not None and known != declared:
            what = (
                f"with model {known.model.__qualname__}, now with {model.__qualname__}"
                if known.model is not model
                else "with other channels or description"
            )
            raise InvalidEventError(f"event {name!r} is already declared {what}")
        self._by_name[name] = declared
        return declared

    def event(
        self, name: str, *, channels: str | Iterable[str] | None = None, description: str | None = None
    ) -> Callable[[ModelT], ModelT]:
        """The decorator form of :meth:`declare`, on the model class; the description
        defaults to the class's docstring."""

        def decorate(model: ModelT) -> ModelT:
            self.declare(name, model, channels=channels, description=description or _docstring(model))
            return model

        return decorate

    # -- documentation ------------------------------------------------------------

    def schemas(self, ref_template: str = OPENAPI_REF) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """Each event's payload schema (a ``$ref``) and the model schemas they refer to,
        as pydantic generates them for serialisation."""
        models = list(dict.fromkeys(t.model for t in self._by_name.values()))
        refs, top = models_json_schema([(m, "serialization") for m in models], ref_template=ref_template)
        by_model = {model: refs[(model, "serialization")] for model in models}
        return {t.name: by_model[t.model] for t in self._by_name.values()}, top.get("$defs", {})

    def item_schema(self) -> dict[str, Any]:
        """The OpenAPI ``itemSchema`` of a ``text/event-stream`` carrying these events."""
        payloads, _ = self.schemas()
        items: list[dict[str, Any]] = []
        for declared in self._by_name.values():
            item: dict[str, Any] = {
                "type": "object",
                "title": declared.name,
                "properties": {
                    **_FRAME_PROPERTIES,
                    "event": {"type": "string", "const": declared.name},
                    "data": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": payloads[declared.name],
                    },
                },
                "required": ["event", "data"],
            }
            if declared.description:
                item["description"] = declared.description
            items.append(item)
        other = {
            "type": "object",
            "title": "other frames",
            "description": "The retry: hint, id-only cursor frames, and events not declared.",
            "properties": dict(_FRAME_PROPERTIES),
        }
        return {"anyOf": [*items, other]}

    def openapi_responses(self, description: str | None = None) -> dict[int | str, dict[str, Any]]:
        """``responses=`` for a route of the app's own that returns ``add_client``'s
        response (with ``response_class=SSEResponse``): the 200 ``text/event-stream``
        lists the declared events with their schemas, in ``components.schemas``."""
        models = tuple(dict.fromkeys(t.model for t in self._by_name.values()))
        # The models ride along as the response's model so that FastAPI puts their
        # schemas in components; the stream itself is text.
        carrier = Annotated[Union[models], WithJsonSchema({"type": "string"})] if models else None  # noqa: UP007
        response: dict[str, Any] = {
            "description": description or "A `text/event-stream` of the events listed in its itemSchema.",
            "content": {"text/event-stream": {"itemSchema": self.item_schema()}},
        }
        if carrier is not None:
            response["model"] = carrier
        return {200: response}

    def asyncapi(
        self,
        *,
        title: str = "Events",
        version: str = "0.1.0",
        description: str | None = None,
        subscribe_path: str | None = None,
    ) -> dict[str, Any]:
        """An AsyncAPI 3.0.0 document of the declared events: a channel per channel
        pattern (its ``{param}`` placeholders as parameters; events declared without
        one on a channel ``any`` without an address), each event a message whose
        payload is its model's JSON schema, and a ``receive`` operation per channel."""
        payloads, definitions = self.schemas("#/components/schemas/{model}")
        messages: dict[str, dict[str, Any]] = {}
        message_keys: dict[str, str] = {}
        for declared in self._by_name.values():
            key = message_keys[declared.name] = _unique(_KEY.sub("_", declared.name), messages)
            message: dict[str, Any] = {
                "name": declared.name,
                "title": declared.name,
                "contentType": "application/json",
                "payload": payloads[declared.name],
            }
            if declared.description:
                message["summary"] = declared.description
            messages[key] = message
        channels: dict[str, dict[str, Any]] = {}
        operations: dict[str, dict[str, Any]] = {}
        by_pattern: dict[str | None, list[str]] = {}
        for declared in self._by_name.values():
            for pattern in declared.channels or (None,):
                by_pattern.setdefault(pattern, []).append(declared.name)
        for pattern, names in by_pattern.items():
            key = _unique((_KEY.sub("_", pattern).strip("_") or "channel") if pattern else "any", channels)
            channel: dict[str, Any] = {
                "address": pattern,
                "messages": {message_keys[n]: {"$ref": f"#/components/messages/{message_keys[n]}"} for n in names},
            }
            if pattern is None:
                channel["description"] = "Any channel: events declared without a channel pattern."
            elif params := placeholders(pattern):
                channel["parameters"] = {p: {"description": f"The {p} part of the channel name."} for p in params}
            channels[key] = channel
            operations[_unique(f"receive_{key}", operations)] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{key}"},
                "messages": [{"$ref": f"#/channels/{key}/messages/{message_keys[n]}"} for n in names],
            }
        info: dict[str, Any] = {"title": title, "version": version}
        how = f"Subscribe with `GET {subscribe_path}?channel=<name>`." if subscribe_path else None
        if text := " ".join(part for part in (how, description) if part):
            info["description"] = text
        return {
            "asyncapi": "3.0.0",
            "info": info,
            "defaultContentType": "application/json",
            "channels": channels,
            "operations": operations,
            "components": {"messages": messages, "schemas": definitions},
        }


def _unique(key: str, taken: Mapping[str, Any]) -> str:
    candidate, n = key, 2
    while candidate in taken:
        candidate, n = f"{key}_{n}", n + 1
    return candidate


def _docstring(model: type[BaseModel]) -> str | None:
    doc = model.__doc__
    return " ".join(doc.split()) if doc and doc is not BaseModel.__doc__ else None


def refuse_other_events(given: EventTypes | None, running: EventTypes | None) -> str | None:
    """Why a second setup of one app may not use the running service (its events
    differ), or None."""
    if given is None or given is running:
        return None
    return f"it was given events={given!r}, while the running service has events={running!r}"


__all__ = ["EventType", "EventTypes"]
