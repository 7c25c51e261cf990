import logging

from fastapi import FastAPI

from docs.examples.auth import CurrentUser
from fastapi_sse import SSEDep, SSEResponse, sse_lifespan

logger = logging.getLogger("app")
app = FastAPI(lifespan=sse_lifespan())


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
