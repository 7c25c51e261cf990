from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request

from fastapi_sse import SSEDep, SSEResponse, sse_lifespan

app = FastAPI(lifespan=sse_lifespan())  # settings come from SSE_* variables


# Demo sign-in: the user id comes from an X-User-Id header. Put your real
# authentication here (a verified session cookie or token).
def current_user(request: Request) -> str:
    user = request.headers.get("x-user-id")
    if not user or not user.isalnum():
        raise HTTPException(401, "sign in first")
    return user


CurrentUser = Annotated[str, Depends(current_user)]


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
