from fastapi import Depends, FastAPI, HTTPException, Request

from fastapi_sse import SSEDep, allow_all, create_sse_router


def require_admin(request: Request) -> None:
    if request.headers.get("authorization") != "Bearer admin-secret":
        raise HTTPException(401, "admin only")


# Client disconnection is handled automatically when
# 1. the client closes the connection,
# 2. a network error occurs,
# 3. the server calls remove_client().
# Shutting the app down (SIGTERM, Ctrl-C) ends every stream first: the router's
# lifespan calls sse.shutdown(), so uvicorn does not wait for endless responses.
app = FastAPI()
app.include_router(create_sse_router(authorize=allow_all))


# Force a client to disconnect
@app.delete("/admin/clients/{client_id}", dependencies=[Depends(require_admin)], status_code=204)
async def disconnect(client_id: str, sse: SSEDep) -> None:
    if not sse.remove_client(client_id):
        raise HTTPException(404, "no such client on this worker")
