import asyncio
import uuid
from typing import Any

from fastapi import BackgroundTasks, FastAPI
from pydantic import BaseModel

from docs.examples.auth import CurrentUser
from fastapi_sse import SSEDep, SSEService, allow_all, create_sse_router

app = FastAPI()
app.include_router(create_sse_router(authorize=allow_all))


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
