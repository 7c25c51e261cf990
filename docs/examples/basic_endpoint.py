import logging
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request

from fastapi_sse import SSEDep, SSEResponse, sse_lifespan

logger = logging.getLogger("app")
app = FastAPI(lifespan=sse_lifespan())


# Demo sign-in: the user id comes from an X-User-Id header. Put your real
# authentication here (a verified session cookie or token).
def current_user(request: Request) -> str:
    user = request.headers.get("x-user-id")
    if not user or not user.isalnum():
        raise HTTPException(401, "sign in first")
    return user


CurrentUser = Annotated[str, Depends(current_user)]


# Subscribe to user-specific updates
@app.get("/subscribe", response_class=SSEResponse)
async def subscribe(sse: SSEDep, user: CurrentUser) -> SSEResponse:
    # Create the SSE client
    client, response = sse.add_client()

    # Subscribe to the user's channel
    sse.subscribe(client.id, f"user:{user}")

    # Log the connection
    logger.info("SSE client connected", extra={"client_id": client.id, "user_id": user})

    return response
