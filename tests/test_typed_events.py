"""Typed events through both doors (the router's subscribe route and a route of the
app's own): validated at publish in the caller's thread, sent as the model's JSON,
listed in OpenAPI, described by an AsyncAPI 3 document."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Header, HTTPException
from helpers.apps import fast_settings, own_route_app, router_app, served
from helpers.documents import check_asyncapi, check_refs_resolve, resolve
from helpers.servers import Served
from helpers.streams import Stream, open_stream
from pydantic import BaseModel, ConfigDict, Field

from fastapi_sse import (
    EventTypes,
    InvalidEventError,
    SSEService,
    allow_all,
    create_sse_router,
    sse_lifespan,
)

events = EventTypes()


class Actor(BaseModel):
    user_id: str = Field(alias="userId")


@events.event("notification", channels="user:{user_id}")
class Notification(BaseModel):
    """Something the user should see."""

    model_config = ConfigDict(populate_by_name=True)

    title: str
    unread: int
    actor: Actor | None = None


class Progress(BaseModel):
    task_id: str = Field(alias="taskId")
    percent: int = Field(ge=0, le=100)


events.declare("progress", Progress, channels=["user:{user_id}", "task:{task_id}"], description="How far a task is.")

DOORS = {
    "router": (lambda: router_app(events=events), "/subscribe", {"channel": "user:1"}),
    "own route": (lambda: own_route_app(events=events), "/events", {"user": "1"}),
}


@contextmanager
def door_stream(door: str) -> Iterator[tuple[Served, SSEService, Stream]]:
    make_app, path, params = DOORS[door]
    with served(make_app()) as (server, sse), open_stream(server.url + path, params=params) as stream:
        yield server, sse, stream


@pytest.fixture(params=list(DOORS))
def door(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_a_declared_event_reaches_the_client_as_the_models_json_from_a_dict_or_an_instance(door: str) -> None:
    with door_stream(door) as (_, sse, stream):
        sse.broadcast("user:1", "notification", {"title": "Hi", "unread": "3"})
        sse.broadcast("user:1", "notification", Notification(title="Yo", unread=1, actor=Actor(userId="ann")))
        sse.broadcast("user:1", "progress", {"taskId": "t1", "percent": 50})
        got = [(e.event, e.data) for e in stream.events(3)]
    assert got == [
        ("notification", '{"title":"Hi","unread":3,"actor":null}'),
        # By alias, as FastAPI serialises a response model.
        ("notification", '{"title":"Yo","unread":1,"actor":{"userId":"ann"}}'),
        ("progress", '{"taskId":"t1","percent":50}'),
    ]


def test_data_that_does_not_fit_raises_naming_the_event_and_the_field_and_nothing_is_sent(door: str) -> None:
    with door_stream(door) as (_, sse, stream):
        before = sse.stats().events_published
        with pytest.raises(InvalidEventError) as raised:
            sse.broadcast("user:1", "notification", {"title": "Hi", "unread": "many"})
        message = str(raised.value)
        assert "'notification'" in message and "Notification" in message and "unread" in message
        assert "\n" not in message  # one readable line
        assert isinstance(raised.value, ValueError)
        with pytest.raises(InvalidEventError, match=r"percent: Input should be less than or equal to 100"):
            sse.broadcast("user:1", "progress", {"taskId": "t1", "percent": 101})
        assert sse.stats().events_published == before
        sse.broadcast("user:1", "marker", {"after": True})
        # The next event on the stream is the one published after the refusals.
        assert (stream.next_event().event, sse.stats().events_published) == ("marker", before + 1)


def test_every_publishing_method_validates_before_sending(door: str) -> None:
    bad = {"title": "Hi"}  # unread missing
    with door_stream(door) as (server, sse, stream):
        (client,) = server.call(sse.get_clients)
        before = sse.stats().events_published
        calls: list[Callable[[], Any]] = [
            lambda: sse.broadcast("user:1", "notification", bad),
            lambda: sse.broadcast_all("notification", bad),
            lambda: sse.send_to(client.id, "notification", bad),
            lambda: server.call(sse.publish, "user:1", "notification", bad),
            lambda: server.call(
                sse.publish_many,
                [("user:1", "notification", {"title": "ok", "unread": 1}), ("user:1", "notification", bad)],
            ),
            lambda: server.call(sse.publish_all, "notification", bad),
            lambda: server.call(sse.publish_to, client.id, "notification", bad),
        ]
        for call in calls:
            with pytest.raises(
                InvalidEventError, match=r"'notification' data does not fit Notification: unread: Field required"
            ):
                call()
        assert sse.stats().events_published == before
        sse.broadcast("user:1", "marker", {})
        assert stream.next_event().event == "marker"


def test_an_instance_of_another_model_is_refused(door: str) -> None:
    with door_stream(door) as (_, sse, stream):
        before = sse.stats().events_published
        with pytest.raises(
            InvalidEventError,
            match=r"'notification' is declared with data of type Notification, got an instance of Progress",
        ):
            sse.broadcast("user:1", "notification", Progress(taskId="t", percent=1))
        assert sse.stats().events_published == before
        sse.broadcast("user:1", "marker", {})
        assert stream.next_event().event == "marker"


def test_undeclared_events_are_sent_as_before(door: str) -> None:
    with door_stream(door) as (_, sse, stream):
        sse.broadcast("user:1", "other", {"title": 1})
        sse.broadcast("user:1", "other", Progress(taskId="t", percent=5))
        # Not validated, and JSON-encoded as any value is (pydantic_core.to_json).
        assert [e.data for e in stream.events(2)] == ['{"title":1}', '{"taskId":"t","percent":5}']


def stream_response(document: dict[str, Any], path: str) -> dict[str, Any]:
    content: dict[str, Any] = document["paths"][path]["get"]["responses"]["200"]["content"]
    return content["text/event-stream"]


def test_the_served_openapi_lists_the_events_with_their_schemas_on_both_doors() -> None:
    app = router_app(events=events)
    own = own_route_app(events=events)
    for application, path in ((app, "/subscribe"), (own, "/events")):
        with served(application) as (server, _):
            document = httpx.get(f"{server.url}/openapi.json").json()
        check_refs_resolve(document)
        items = stream_response(document, path)["itemSchema"]["anyOf"]
        by_event = {item["properties"]["event"].get("const"): item for item in items}
        assert set(by_event) == {"notification", "progress", None}  # None: the other frames
        data = by_event["notification"]["properties"]["data"]
        assert data["contentMediaType"] == "application/json"
        schema = resolve(document, data["contentSchema"]["$ref"])
        assert set(schema["properties"]) == {"title", "unread", "actor"}
        assert by_event["notification"]["description"] == "Something the user should see."
        progress = resolve(document, by_event["progress"]["properties"]["data"]["contentSchema"]["$ref"])
        assert set(progress["properties"]) == {"taskId", "percent"}
        assert "Actor" in document["components"]["schemas"]


def test_the_router_serves_the_asyncapi_document_which_resolves() -> None:
    app = FastAPI(title="Typed", version="2.1.0")
    app.include_router(create_sse_router(fast_settings(), authorize=allow_all, events=events))
    with served(app) as (server, _):
        response = httpx.get(f"{server.url}/asyncapi.json")
    assert response.status_code == 200
    document = response.json()
    check_asyncapi(document)
    assert (document["info"]["title"], document["info"]["version"]) == ("Typed", "2.1.0")
    assert "GET /subscribe" in document["info"]["description"]
    addresses = {channel["address"]: channel for channel in document["channels"].values()}
    assert set(addresses) == {"user:{user_id}", "task:{task_id}"}
    assert set(addresses["user:{user_id}"]["messages"]) == {"notification", "progress"}
    assert set(addresses["task:{task_id}"]["parameters"]) == {"task_id"}
    message = resolve(document, addresses["user:{user_id}"]["messages"]["notification"]["$ref"])
    assert message["name"] == "notification"
    payload = resolve(document, message["payload"]["$ref"])
    actor = resolve(document, payload["properties"]["actor"]["anyOf"][0]["$ref"])
    assert set(actor["properties"]) == {"userId"}
    assert document == events.asyncapi(title="Typed", version="2.1.0", subscribe_path="/subscribe")


def test_events_without_a_channel_pattern_are_on_a_general_channel() -> None:
    loose = EventTypes()
    loose.declare("tick", Progress)
    document = loose.asyncapi(title="Ticks", version="1")
    check_asyncapi(document)
    (channel,) = document["channels"].values()
    assert channel["address"] is None and set(channel["messages"]) == {"tick"}


def test_the_asyncapi_route_can_be_protected_or_left_out() -> None:
    def token(x_token: str | None = Header(None)) -> None:
        if x_token != "secret":
            raise HTTPException(401, "no token")

    protected = router_app(events=events, asyncapi_dependencies=[Depends(token)])
    with served(protected) as (server, _):
        assert httpx.get(f"{server.url}/asyncapi.json").status_code == 401
        ok = httpx.get(f"{server.url}/asyncapi.json", headers={"X-Token": "secret"})
        assert ok.status_code == 200 and ok.json()["asyncapi"] == "3.0.0"
    absent = router_app(events=events, asyncapi_path=None)
    with served(absent) as (server, _):
        assert httpx.get(f"{server.url}/asyncapi.json").status_code == 404
    untyped = router_app()
    assert "/asyncapi.json" not in untyped.openapi()["paths"]


def start(app: FastAPI) -> None:
    async def run() -> None:
        async with app.router.lifespan_context(app):
            pass

    asyncio.run(run())


def test_another_registry_on_the_router_than_on_the_lifespan_is_refused_at_startup() -> None:
    other = EventTypes()
    other.declare("elsewhere", Progress)
    app = FastAPI(lifespan=sse_lifespan(fast_settings(), events=other))
    app.include_router(create_sse_router(authorize=allow_all, events=events))
    with pytest.raises(
        RuntimeError,
        match=r"given events=EventTypes\(notification, progress\).*running service has events=EventTypes\(elsewhere\)",
    ):
        start(app)
    # A lifespan without events starts a service that would not validate the router's.
    bare = FastAPI(lifespan=sse_lifespan(fast_settings()))
    bare.include_router(create_sse_router(authorize=allow_all, events=events))
    with pytest.raises(RuntimeError, match=r"events=None"):
        start(bare)


def test_the_same_registry_on_the_router_and_the_lifespan_is_one_service() -> None:
    app = FastAPI(lifespan=sse_lifespan(fast_settings(), events=events))
    app.include_router(create_sse_router(authorize=allow_all, events=events))
    with served(app) as (server, sse), open_stream(f"{server.url}/subscribe", params={"channel": "user:1"}) as stream:
        assert sse.events is events
        sse.broadcast("user:1", "progress", {"taskId": "t", "percent": 1})
        assert stream.next_event().data == '{"taskId":"t","percent":1}'


def test_a_service_given_to_the_lifespan_must_carry_its_events() -> None:
    app = FastAPI(lifespan=sse_lifespan(service=SSEService(fast_settings()), events=events))
    with pytest.raises(RuntimeError, match=r"events=EventTypes\(notification, progress\).*events=None"):
        start(app)


def test_a_route_that_lets_the_error_escape_answers_500() -> None:
    app = router_app(events=events)

    @app.post("/notify")
    async def notify(body: dict[str, Any]) -> None:
        app.state.sse.broadcast("user:1", "notification", body)

    with served(app) as (server, sse):
        before = sse.stats().events_published
        response = httpx.post(f"{server.url}/notify", json={"title": "no count"})
        assert (response.status_code, response.text) == (500, "Internal Server Error")
        assert sse.stats().events_published == before


def test_declaring_a_name_again_with_another_model_is_an_error() -> None:
    registry = EventTypes()
    registry.declare("a", Progress, channels="task:{task_id}")
    registry.declare("a", Progress, channels="task:{task_id}")  # the same again: fine
    with pytest.raises(InvalidEventError, match=r"'a' is already declared with model Progress, now with Actor"):
        registry.declare("a", Actor)
    with pytest.raises(InvalidEventError, match=r"other channels"):
        registry.declare("a", Progress, channels="job:{id}")
    with pytest.raises(ValueError, match=r"placeholder"):
        registry.declare("b", Progress, channels="task:{task id}")
    with pytest.raises(InvalidEventError, match=r"dispatched by browsers"):
        registry.declare("error", Progress)
    with pytest.raises(InvalidEventError, match=r"pydantic BaseModel"):
        registry.declare("c", dict)  # type: ignore[arg-type]
    assert list(registry.types) == ["a"] and "a" in registry and len(registry) == 1


def test_the_decorator_returns_the_model_and_takes_its_docstring() -> None:
    registry = EventTypes()

    @registry.event("ping-ish")
    class Pingish(BaseModel):
        """A small event."""

        n: int

    assert registry.types["ping-ish"].model is Pingish
    assert registry.types["ping-ish"].description == "A small event."
    assert json.loads(registry.types["ping-ish"].encode({"n": 1})) == {"n": 1}
