import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel

from fastapi_sse import SSEDep, SSEResponse, sse_lifespan

app = FastAPI(lifespan=sse_lifespan())
DOCUMENT_READERS = {"roadmap": {"alice", "bob"}}  # who may open which document
changes: dict[str, list[Any]] = {}


# Demo sign-in: the user id comes from an X-User-Id header. Put your real
# authentication here (a verified session cookie or token).
def current_user(request: Request) -> str:
    user = request.headers.get("x-user-id")
    if not user or not user.isalnum():
        raise HTTPException(401, "sign in first")
    return user


CurrentUser = Annotated[str, Depends(current_user)]


def check_document_access(user_id: str, doc_id: str) -> bool:
    return user_id in DOCUMENT_READERS.get(doc_id, set())


# Document collaboration
@app.get("/document/{doc_id}/live", response_class=SSEResponse)
async def document_live(doc_id: str, request: Request, sse: SSEDep, user: CurrentUser) -> SSEResponse:
    # Verify access
    if not check_document_access(user, doc_id):
        raise HTTPException(403, "Forbidden")

    client, response = sse.add_client(request.headers.get("last-event-id"))
    sse.subscribe(client.id, f"document:{doc_id}")

    # Notify others of the new collaborator
    sse.broadcast(f"document:{doc_id}", "userJoined", {"userId": user, "name": user.title()})

    return response


class Edit(BaseModel):
    changes: Any


# Broadcast document changes
@app.post("/document/{doc_id}/edit")
async def edit_document(doc_id: str, edit: Edit, sse: SSEDep, user: CurrentUser) -> dict[str, bool]:
    if not check_document_access(user, doc_id):
        raise HTTPException(403, "Forbidden")

    # Save the changes
    changes.setdefault(doc_id, []).append(edit.changes)

    # Broadcast to every viewer
    sse.broadcast(
        f"document:{doc_id}",
        "documentChanged",
        {"changes": edit.changes, "userId": user, "timestamp": int(time.time() * 1000)},
    )
    return {"success": True}
