import itertools
from typing import Annotated, Any

from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel

from fastapi_sse import SSEDep, SSEResponse, SSEService, sse_lifespan

app = FastAPI(lifespan=sse_lifespan())
messages: list[dict[str, Any]] = []  # stands in for a database table
message_ids = itertools.count(1)


# Demo sign-in: the user id comes from an X-User-Id header. Put your real
# authentication here (a verified session cookie or token).
def current_user(request: Request) -> str:
    user = request.headers.get("x-user-id")
    if not user or not user.isalnum():
        raise HTTPException(401, "sign in first")
    return user


CurrentUser = Annotated[str, Depends(current_user)]


@app.get("/events", response_class=SSEResponse)
async def events(sse: SSEDep, user: CurrentUser) -> SSEResponse:
    client, response = sse.add_client()
    sse.subscribe(client.id, f"user:{user}")
    return response


class MessageIn(BaseModel):
    recipient_id: str
    content: str


# From a route handler
@app.post("/messages")
async def send_message(body: MessageIn, sse: SSEDep, user: CurrentUser) -> dict[str, Any]:
    message = {"id": next(message_ids), "from_user_id": user, "to_user_id": body.recipient_id, "content": body.content}
    messages.append(message)

    # Push to the recipient in real time
    sse.broadcast(
        f"user:{body.recipient_id}",
        "newMessage",
        {"id": message["id"], "from": user, "content": body.content},
    )
    return message


# From a background job
class Announcement(BaseModel):
    title: str
    message: str
    priority: str = "normal"


def broadcast_announcement(sse: SSEService, data: Announcement) -> None:
    # Send to every connected client
    sse.broadcast_all("announcement", {"title": data.title, "message": data.message, "priority": data.priority})


@app.post("/announcements", status_code=202)
async def announce(body: Announcement, sse: SSEDep, jobs: BackgroundTasks) -> None:
    jobs.add_task(broadcast_announcement, sse, body)
