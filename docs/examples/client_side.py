from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse

from fastapi_sse import SSEDep, SSEResponse, sse_lifespan

app = FastAPI(lifespan=sse_lifespan())


@app.get("/")
async def page() -> FileResponse:
    return FileResponse(Path(__file__).with_name("client.html"))


@app.get("/subscribe", response_class=SSEResponse)
async def subscribe(request: Request, sse: SSEDep) -> SSEResponse:
    # The cookie EventSource sends (withCredentials) identifies the user.
    user = request.cookies.get("user_id", "guest")
    client, response = sse.add_client(request.headers.get("last-event-id"))
    sse.subscribe(client.id, f"user:{user}")
    return response


@app.post("/users/{user_id}/notify")
async def notify(user_id: str, message: str, sse: SSEDep) -> None:
    sse.broadcast(f"user:{user_id}", "notification", {"message": message})
