import asyncio
import uuid
from typing import Annotated, Any

from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel

from fastapi_sse import Run, SSEDep, create_sse_router


# Demo sign-in: the user id comes from an X-User-Id header. Put your real
# authentication here (a verified session cookie or token).
def current_user(request: Request) -> str:
    user = request.headers.get("x-user-id")
    if not user or not user.isalnum():
        raise HTTPException(401, "sign in first")
    return user


CurrentUser = Annotated[str, Depends(current_user)]


def own_tasks_only(request: Request, channel: str) -> bool:
    """The run routes ask for ``run:<taskId>``: a task's id starts with its user's."""
    return channel.startswith(f"run:{current_user(request)}.")


app = FastAPI()
# GET /runs/{taskId} follows a task, POST /runs/{taskId}/cancel stops it.
app.include_router(create_sse_router(authorize=own_tasks_only))


async def process_item(item: Any) -> None:
    await asyncio.sleep(0)  # the real work goes here


# The job is a run: its progress events are kept for whoever follows it
async def long_process(run: Run, items: list[Any]) -> None:
    async with run:  # an exception ends it as failed, a cancel as cancelled
        total = len(items)
        for i, item in enumerate(items):
            await process_item(item)

            # Send a progress update
            await run.send(
                "taskProgress",
                {"taskId": run.id, "current": i + 1, "total": total, "percent": round((i + 1) / total * 100)},
            )

        # The end: every viewer gets `end` {"status": "done", "result": {"processed": total}}
        await run.finish({"processed": total})


class ProcessIn(BaseModel):
    data: list[Any]


# A long-running task with progress
@app.post("/process", status_code=202)
async def process(body: ProcessIn, sse: SSEDep, user: CurrentUser, jobs: BackgroundTasks) -> dict[str, str]:
    run = await sse.runs.open(f"{user}.{uuid.uuid4().hex}")

    # Start the background processing
    jobs.add_task(long_process, run, body.data)

    return {"taskId": run.id}
