from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

from fastapi_sse import EventTypes, InvalidEventError, SSEDep, SSEResponse, sse_lifespan

# --8<-- [start:declare]
events = EventTypes()


@events.event("notification", channels="user:{user_id}")
class Notification(BaseModel):
    """A new notification for the user."""

    title: str
    unread: int = Field(ge=0)


class Progress(BaseModel):
    task_id: str = Field(alias="taskId")
    percent: int = Field(ge=0, le=100)


events.declare("progress", Progress, channels="user:{user_id}", description="How far the user's task is.")
# --8<-- [end:declare]

app = FastAPI(title="Typed events", version="1.0.0", lifespan=sse_lifespan(events=events))


# Demo sign-in: the user id comes from an X-User-Id header. Put your real
# authentication here (a verified session cookie or token).
def current_user(request: Request) -> str:
    user = request.headers.get("x-user-id")
    if not user or not user.isalnum():
        raise HTTPException(401, "sign in first")
    return user


CurrentUser = Annotated[str, Depends(current_user)]


# --8<-- [start:stream]
# The stream route of the app's own: its 200 response lists the events and their schemas.
@app.get("/events", response_class=SSEResponse, responses=events.openapi_responses())
async def stream(sse: SSEDep, user: CurrentUser) -> SSEResponse:
    client, response = sse.add_client(identity=user)
    sse.subscribe(client.id, f"user:{user}")
    return response


# The AsyncAPI 3 document of the declared events.
@app.get("/asyncapi.json")
async def asyncapi() -> dict[str, Any]:
    return events.asyncapi(title=app.title, version=app.version, description="GET /events streams your events.")


# --8<-- [end:stream]


# --8<-- [start:publish]
@app.post("/notify")
async def notify(sse: SSEDep, user: CurrentUser) -> None:
    # An instance of the declared model is sent as its JSON (by alias).
    sse.broadcast(f"user:{user}", "notification", Notification(title="Welcome", unread=1))


@app.post("/progress")
async def progress(body: dict[str, Any], sse: SSEDep, user: CurrentUser) -> None:
    # A dict is validated against Progress before anything is sent.
    try:
        sse.broadcast(f"user:{user}", "progress", body)
    except InvalidEventError as exc:
        raise HTTPException(422, str(exc)) from None


# --8<-- [end:publish]
