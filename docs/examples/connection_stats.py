from collections import Counter
from datetime import UTC, datetime
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request

from fastapi_sse import SSEDep, allow_all, create_sse_router


def require_admin(request: Request) -> None:
    if request.headers.get("authorization") != "Bearer admin-secret":
        raise HTTPException(401, "admin only")


app = FastAPI()
# The router's own statistics route exists only once you say who may read it.
app.include_router(create_sse_router(authorize=allow_all, admin_dependencies=[Depends(require_admin)]))


# Statistics of your own, computed from get_clients()
@app.get("/admin/summary", dependencies=[Depends(require_admin)])
async def connections(sse: SSEDep) -> dict[str, Any]:
    clients = sse.get_clients()

    by_channel: Counter[str] = Counter()
    for client in clients:
        by_channel.update(client.channels)

    return {
        "totalConnections": len(clients),
        "byChannel": by_channel,
        "oldestConnection": min((c.created_at for c in clients), default=datetime.now(UTC)),
    }
