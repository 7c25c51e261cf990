import asyncio
import uuid
from typing import Annotated, Any

from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel

from fastapi_sse import SSEDep, SSEService, create_sse_router


# Demo sign-in: the user id comes from an X-User-Id header. Put your real
# authentication here (a verified session cookie or token).
def current_user(request: Request) -> str:
    user = request.headers.get("x-user-id")
    if not user or not user.isalnum():
        raise HTTPException(401, "sign in first")
    return user


CurrentUser = Annotated[str, Depends(current_user)]


def user_channel(request: Request) -> list[str]:
    """Each stream gets its own user's channel, from the sign-in (never from the query)."""
    return [f"user:{current_user(request)}"]


def no_other_channel(request: Request, channel: str) -> bool:
    """A ?channel= beyond the user's own is refused (HTTP 403)."""
    return False


app = FastAPI()
# GET /subscribe opens a stream on the signed-in user's channel.
app.include_router(create_sse_router(authorize=no_other_channel, default_channels=user_channel))


async def process_item(item: Any) -> None:
    await asyncio.sleep(0)  # the real work goes here


# The job: report progress to the user's channel
async def long_process(sse: SSEService, task_id: str, items: list[Any], user_id: str) -> None:
    total = len(items)
    for i, item in enumerate(items):
        await process_item(item)

        # Send a progress update
        sse.broadcast(
            f"user:{user_id}",
            "taskProgress",
            {"taskId": task_id, "current": i + 1, "total": total, "percent": round((i + 1) / total * 100)},
        )

    # Send the completion
    sse.broadcast(f"user:{user_id}", "taskComplete", {"taskId": task_id, "result": "success"})


class ProcessIn(BaseModel):
    data: list[Any]


# A long-running task with progress
@app.post("/process", status_code=202)
async def process(body: ProcessIn, sse: SSEDep, user: CurrentUser, jobs: BackgroundTasks) -> dict[str, str]:
    task_id = str(uuid.uuid4())

    # Start the background processing
    jobs.add_task(long_process, sse, task_id, body.data, user)

    return {"taskId": task_id}
