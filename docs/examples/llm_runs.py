import asyncio
from collections.abc import AsyncIterator

from fastapi import FastAPI, Response
from pydantic import BaseModel, Field

from fastapi_sse import Run, SSEDep, allow_all, create_sse_router

app = FastAPI()
# GET /runs/{run_id} follows a run, POST /runs/{run_id}/cancel stops it. A run's id is
# random (128 bits): here whoever has it may follow and stop the run, like a shared
# link. To check who asks, give authorize a hook that decides the channel run:<run_id>.
app.include_router(create_sse_router(authorize=allow_all))


async def generate(prompt: str) -> AsyncIterator[str]:
    """Stands in for a language model: its answer, one token at a time."""
    for word in f"You said: {prompt}".split():
        await asyncio.sleep(0.05)
        yield word + " "


# The producer: leaving the block ends the run; an exception fails it, a cancel
# (from any worker) makes the next send raise and ends it as cancelled
async def answer(run: Run, prompt: str) -> None:
    async with run:
        text = ""
        async for token in generate(prompt):
            await run.send("token", {"text": token})
            text += token
        await run.finish({"text": text})


class ChatIn(BaseModel):
    prompt: str = Field(min_length=1, max_length=2000)


answering: set[asyncio.Task[None]] = set()  # the answers being written


@app.post("/chat", status_code=202)
async def chat(body: ChatIn, sse: SSEDep) -> dict[str, str]:
    run = await sse.runs.open()  # a new random id; run_id="..." to choose it
    task = asyncio.create_task(answer(run, body.prompt))  # it outlives this request
    answering.add(task)
    task.add_done_callback(answering.discard)
    return {"run_id": run.id}


# The same stream from a route of the app's own: the run from its start, or from the
# request's Last-Event-ID (or ?last_event_id=), to its end
@app.get("/chat/{run_id}/events")
async def chat_events(run_id: str, sse: SSEDep) -> Response:
    return await sse.runs.stream(run_id)


@app.post("/chat/{run_id}/stop", status_code=202)
async def stop(run_id: str, sse: SSEDep) -> dict[str, bool]:
    return {"stopping": await sse.runs.cancel(run_id)}
