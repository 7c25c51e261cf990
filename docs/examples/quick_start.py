from fastapi import FastAPI

from docs.examples.auth import CurrentUser
from fastapi_sse import SSEDep, SSEResponse, sse_lifespan

app = FastAPI(lifespan=sse_lifespan())  # settings come from SSE_* variables


# Create the SSE endpoint
@app.get("/events", response_class=SSEResponse)
async def events(sse: SSEDep, user: CurrentUser) -> SSEResponse:
    client, response = sse.add_client()
    sse.subscribe(client.id, f"user:{user}")
    return response


# Broadcast updates from anywhere
@app.post("/users/{user_id}/notify")
async def notify(user_id: str, sse: SSEDep) -> None:
    sse.broadcast(f"user:{user_id}", "notification", {"message": "You have a new message"})
