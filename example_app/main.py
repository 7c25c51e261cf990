"""The example app: every real-world example of the SSE service on one page.

Run it with ``uvicorn example_app.main:app`` (in-memory backend; every ``SSE_*``
variable applies, so ``SSE_BACKEND=redis`` runs it on Redis). See README.md next
to this file for the routes and the events they produce.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from example_app.events import events
from example_app.store import Store
from fastapi_sse import (
    InvalidEventError,
    Run,
    ServiceNotRunningError,
    SSEClient,
    SSEDep,
    SSEMiddleware,
    SSEResponse,
    SSEService,
    SSESettings,
    create_sse_router,
    get_sse_from_app,
)

STATIC = Path(__file__).parent / "static"
USER_ID = re.compile(r"[A-Za-z0-9]{1,32}")
DOC_ID = r"^[A-Za-z0-9_-]{1,64}$"
DASHBOARD_CHANNELS = frozenset({"dashboard:stats", "dashboard:orders", "dashboard:alerts"})
DOCUMENT_CHANNEL = re.compile(r"document:[A-Za-z0-9_-]{1,64}")
COOKIE = "user_id"
MAX_BODY_BYTES = 64 * 1024  # the largest request body any route reads


# -- request bodies, bounded --------------------------------------------------------


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with HTTP 413, whether announced by
    ``Content-Length`` or streamed in chunks, before a route reads them whole."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            await Response("request body too large", status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, "request body too large")
            return message

        await self.app(scope, limited, send)


# -- who is asking -------------------------------------------------------------------


def signed_in_user(request: Request) -> str | None:
    """The demo sign-in: a ``user_id`` cookie (a real app verifies a session)."""
    user = request.cookies.get(COOKIE)
    return user if user is not None and USER_ID.fullmatch(user) else None


def current_user(request: Request) -> str:
    user = signed_in_user(request)
    if user is None:
        raise HTTPException(401, "sign in first (POST /login)")
    return user


CurrentUser = Annotated[str, Depends(current_user)]


def require_admin(request: Request) -> None:
    """Operator routes need ``Authorization: Bearer <EXAMPLE_ADMIN_TOKEN>``."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(401, "admin token required", headers={"WWW-Authenticate": "Bearer"})
    if not secrets.compare_digest(token.encode(), request.app.state.admin_token.encode()):
        raise HTTPException(403, "wrong admin token")


# -- the SSE router's hooks ------------------------------------------------------------


def user_channels(request: Request) -> list[str]:
    """A signed-in user is always subscribed to their own channel; anonymous gets 401."""
    return [f"user:{current_user(request)}"]


def can_access_channel(request: Request, channel: str) -> bool:
    """Also decides the router's run routes (channel ``run:<run_id>``): a user may view
    and stop only their own runs, whose ids start with their name (``alice.<hex>``)."""
    user = current_user(request)
    if channel.startswith("user:"):
        return channel == f"user:{user}"
    if channel.startswith("run:"):
        # User names are letters and digits only: "al." never prefixes "alice."'s runs.
        return channel.startswith(f"run:{user}.")
    return channel in DASHBOARD_CHANNELS or DOCUMENT_CHANNEL.fullmatch(channel) is not None


def state_of(request: Request, sse: SSEService, user: str) -> dict[str, Any]:
    """Everything the page shows, for ``initialState`` and ``GET /api/state``."""
    store: Store = request.app.state.store
    return {
        "user": user,
        "notifications": store.notifications.get(user, []),
        "unreadCount": store.unread_count(user),
        "stats": store.stats(len(sse.get_clients())),
        "orders": store.orders[-20:],
        "document": {"id": "welcome", "changes": store.documents.get("welcome", [])[-20:]},
    }


def on_connect(request: Request, client: SSEClient, sse: SSEService) -> None:
    """Send the initial state to the new stream and tell documents who joined."""
    user = current_user(request)
    sse.send_to(client.id, "initialState", state_of(request, sse, user))
    for channel in sorted(client.channels):
        if channel.startswith("document:"):
            sse.broadcast(channel, "userJoined", {"userId": user, "name": user})


# -- request bodies -----------------------------------------------------------------


class NotificationIn(BaseModel):
    title: str = Field(min_length=1, max_length=200)
    body: str = Field("", max_length=2000)


class OrderIn(BaseModel):
    total: float = Field(ge=0)
    customer: str = Field(min_length=1, max_length=100)


class EditIn(BaseModel):
    changes: str = Field(min_length=1, max_length=2000)


class TaskIn(BaseModel):
    items: int = Field(10, ge=1, le=1000)


class PromptIn(BaseModel):
    prompt: str = Field(min_length=1, max_length=2000)


class PublishIn(BaseModel):
    channel: str
    event: str
    data: Any = None
    id: str | None = None


class AnnounceIn(BaseModel):
    title: str = Field(min_length=1, max_length=200)
    message: str = Field("", max_length=2000)
    priority: str = "normal"


# -- background work ----------------------------------------------------------------


def publish_stats(app: FastAPI) -> None:
    sse = get_sse_from_app(app)
    sse.broadcast("dashboard:stats", "statsUpdate", app.state.store.stats(len(sse.get_clients())))


async def publish_stats_every(app: FastAPI, interval: float) -> None:
    """A cron-like job: refresh every dashboard viewer's stats periodically."""
    while True:
        await asyncio.sleep(interval)
        with contextlib.suppress(ServiceNotRunningError):
            publish_stats(app)


async def run_task(sse: SSEService, user: str, task_id: str, items: int, step: float) -> None:
    """A long job that reports its progress to its user's channel."""
    for i in range(items):
        await asyncio.sleep(step)  # stands in for processing one item
        sse.broadcast(
            f"user:{user}",
            "taskProgress",
            {"taskId": task_id, "current": i + 1, "total": items, "percent": round((i + 1) * 100 / items)},
        )
    sse.broadcast(f"user:{user}", "taskComplete", {"taskId": task_id, "result": "success"})


def canned_answer(prompt: str) -> str:
    """What the fake model says: made up from the prompt, always the same for it."""
    topic = " ".join(prompt.split()[:12])
    return (
        f"You asked: {topic}. This is a made-up answer, streamed one word at a time the way "
        "a language model streams its tokens. Each word is an event of a run, kept so that a "
        "page reloaded mid-answer resumes where it left off, and a last event says how the run ended."
    )


def answer_tokens(prompt: str) -> list[str]:
    """The answer cut into tokens (words and the space after them): they join back into it."""
    return re.findall(r"\S+\s*", canned_answer(prompt))


async def fake_model(run: Run, prompt: str, interval: float) -> None:
    """The producer: one ``token`` event every ``interval`` seconds, then the full text as
    the run's result. A stop (``POST /sse/runs/<id>/cancel``) makes the next ``send``
    raise, and leaving the ``async with`` ends the run as ``cancelled``."""
    with contextlib.suppress(ServiceNotRunningError):  # the server shutting down mid-answer
        async with run:
            text = ""
            for token in answer_tokens(prompt):
                await asyncio.sleep(interval)  # stands in for the model computing a token
                await run.send("token", {"text": token})
                text += token
            await run.finish({"text": text})


# -- the app ----------------------------------------------------------------------------


def create_app(
    settings: SSESettings | None = None,
    *,
    admin_token: str | None = None,
    stats_interval: float = 30.0,
    task_step: float = 0.3,
    token_interval: float | None = None,
) -> FastAPI:
    """Build the example app. ``settings=None`` reads ``SSE_*`` variables at startup;
    ``admin_token=None`` reads ``EXAMPLE_ADMIN_TOKEN``; ``token_interval=None`` reads
    ``EXAMPLE_TOKEN_INTERVAL`` (seconds between the assistant's tokens, 0.05 by default)."""
    interval = token_interval if token_interval is not None else float(os.environ.get("EXAMPLE_TOKEN_INTERVAL", "0.05"))
    producers: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ticker = asyncio.create_task(publish_stats_every(app, stats_interval))
        try:
            yield
        finally:
            for task in (ticker, *producers):
                task.cancel()
            for task in (ticker, *producers):
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(title="fastapi-sse-channels example", lifespan=lifespan)
    app.state.store = Store()
    app.state.admin_token = admin_token or os.environ.get("EXAMPLE_ADMIN_TOKEN", "dev-admin-token")
    app.include_router(
        create_sse_router(
            settings,
            authorize=can_access_channel,
            default_channels=user_channels,
            identify=signed_in_user,
            on_connect=on_connect,
            admin_dependencies=[Depends(require_admin)],
            events=events,  # validated on publish, in /docs and at /sse/asyncapi.json
        ),
        prefix="/sse",
    )
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit)
    # Open streams leave the route's frames behind: about 10 KiB less per connection.
    app.add_middleware(SSEMiddleware)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.post("/login")
    async def login(request: Request) -> Response:
        # The body is at most MAX_BODY_BYTES (BodyLimit).
        form = parse_qs((await request.body()).decode(errors="replace"))
        user = (form.get("user_id") or [""])[0].strip()
        if not USER_ID.fullmatch(user):
            raise HTTPException(400, "user_id must be 1 to 32 letters or digits")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, user, httponly=True, samesite="lax")
        return response

    @app.post("/logout")
    async def logout() -> Response:
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @app.get("/api/state")
    async def get_state(request: Request, sse: SSEDep, user: CurrentUser) -> dict[str, Any]:
        return state_of(request, sse, user)

    @app.post("/api/notifications", status_code=201)
    async def create_notification(body: NotificationIn, sse: SSEDep, user: CurrentUser) -> dict[str, Any]:
        store: Store = app.state.store
        saved = store.add_notification(user, body.title, body.body)
        sse.broadcast(
            f"user:{user}",
            "notification",
            {k: saved[k] for k in ("id", "title", "body", "type", "createdAt")},
        )
        sse.broadcast(f"user:{user}", "unreadCount", {"count": store.unread_count(user)})
        return saved

    @app.post("/api/notifications/read")
    async def mark_read(sse: SSEDep, user: CurrentUser) -> dict[str, int]:
        store: Store = app.state.store
        store.mark_all_read(user)
        count = store.unread_count(user)
        sse.broadcast(f"user:{user}", "unreadCount", {"count": count})
        return {"count": count}

    @app.post("/api/orders", status_code=201)
    async def create_order(body: OrderIn, sse: SSEDep, user: CurrentUser) -> dict[str, Any]:
        order = app.state.store.add_order(body.total, body.customer)
        sse.broadcast("dashboard:orders", "newOrder", order)
        publish_stats(app)
        return dict(order)

    @app.post("/api/documents/{doc_id}/edit")
    async def edit_document(
        doc_id: Annotated[str, PathParam(pattern=DOC_ID)], body: EditIn, sse: SSEDep, user: CurrentUser
    ) -> dict[str, bool]:
        change = app.state.store.add_change(doc_id, user, body.changes)
        sse.broadcast(f"document:{doc_id}", "documentChanged", change)
        return {"success": True}

    @app.get("/document/{doc_id}/live", response_class=SSEResponse)
    async def document_live(
        doc_id: Annotated[str, PathParam(pattern=DOC_ID)], request: Request, sse: SSEDep, user: CurrentUser
    ) -> SSEResponse:
        client, response = sse.add_client(request.headers.get("last-event-id"), identity=user)
        sse.subscribe(client.id, f"document:{doc_id}")
        sse.broadcast(f"document:{doc_id}", "userJoined", {"userId": user, "name": user})
        return response

    @app.post("/api/tasks", status_code=202)
    async def start_task(body: TaskIn, sse: SSEDep, user: CurrentUser, jobs: BackgroundTasks) -> dict[str, str]:
        task_id = str(uuid.uuid4())
        jobs.add_task(run_task, sse, user, task_id, body.items, task_step)
        return {"taskId": task_id}

    @app.post("/api/assistant", status_code=202)
    async def ask_assistant(body: PromptIn, sse: SSEDep, user: CurrentUser) -> dict[str, str]:
        # The run's id names its user: can_access_channel lets only them view or stop it.
        run = await sse.runs.open(f"{user}.{uuid.uuid4().hex}")
        # Not BackgroundTasks: the answer outlives this request, and a stop ends it early.
        task = asyncio.create_task(fake_model(run, body.prompt, interval))
        producers.add(task)
        task.add_done_callback(producers.discard)
        return {"runId": run.id}

    @app.post("/admin/publish", dependencies=[Depends(require_admin)])
    async def admin_publish(body: PublishIn, sse: SSEDep) -> dict[str, str]:
        try:
            event_id = await sse.publish(body.channel, body.event, body.data, body.id)
        except InvalidEventError as exc:
            raise HTTPException(400, str(exc)) from None
        return {"id": event_id}

    @app.post("/admin/announce", dependencies=[Depends(require_admin)])
    async def admin_announce(body: AnnounceIn, sse: SSEDep) -> dict[str, bool]:
        sse.broadcast_all("announcement", body.model_dump())
        return {"success": True}

    return app


app = create_app()
