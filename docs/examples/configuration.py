from fastapi import FastAPI

from fastapi_sse import SSESettings, allow_all, create_sse_router

settings = SSESettings(
    heartbeat_interval=30.0,  # keep-alive interval in seconds (default: 30)
    retry_interval=3.0,  # client reconnect hint in seconds (default: 3)
)

app = FastAPI()
app.include_router(create_sse_router(settings, authorize=allow_all))
