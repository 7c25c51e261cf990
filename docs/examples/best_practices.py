import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request

from fastapi_sse import SSEDep, SSEResponse, SSEService, sse_lifespan

app = FastAPI(lifespan=sse_lifespan())
TEAMS = {"alice": "red", "bob": "blue"}
UNREAD = {"alice": 3}


# Demo sign-in: the user id comes from an X-User-Id header. Put your real
# authentication here (a verified session cookie or token).
def current_user(request: Request) -> str:
    user = request.headers.get("x-user-id")
    if not user or not user.isalnum():
        raise HTTPException(401, "sign in first")
    return user


CurrentUser = Annotated[str, Depends(current_user)]


# --8<-- [start:specific-channels]
@app.get("/orders/{order_id}/live", response_class=SSEResponse)
async def order_live(order_id: str, sse: SSEDep, user: CurrentUser) -> SSEResponse:
    client, response = sse.add_client()
    # Good - targeted channels
    sse.subscribe(client.id, f"user:{user}")
    sse.subscribe(client.id, f"order:{order_id}")
    sse.subscribe(client.id, f"team:{TEAMS[user]}")
    # Bad - one channel for everything: sse.subscribe(client.id, "all")
    return response


# --8<-- [end:specific-channels]


# --8<-- [start:event-ids]
def order_shipped(sse: SSEService, order_id: str) -> None:
    # Your own id (never digits only); without one the service numbers the event.
    sse.broadcast(f"order:{order_id}", "orderShipped", {"orderId": order_id}, f"evt-{time.time_ns()}")


@app.get("/events", response_class=SSEResponse)
async def events(request: Request, sse: SSEDep, user: CurrentUser) -> SSEResponse:
    # The client resumes from the last event it saw
    client, response = sse.add_client(last_event_id=request.headers.get("last-event-id"))
    sse.subscribe(client.id, f"user:{user}")
    return response


# --8<-- [end:event-ids]


# --8<-- [start:initial-state]
@app.get("/subscribe", response_class=SSEResponse)
async def subscribe(sse: SSEDep, user: CurrentUser) -> SSEResponse:
    client, response = sse.add_client()

    sse.subscribe(client.id, f"user:{user}")

    # Send the initial state immediately
    sse.send_to(client.id, "initialState", {"unreadNotifications": UNREAD.get(user, 0), "online": True})

    return response


# --8<-- [end:initial-state]


# --8<-- [start:client-limits]
MAX_STREAMS_PER_USER = 5


@app.get("/limited", response_class=SSEResponse)
async def limited(sse: SSEDep, user: CurrentUser) -> SSEResponse:
    # Limit connections per user
    existing = sse.get_clients_by_channel(f"user:{user}")
    if len(existing) >= MAX_STREAMS_PER_USER:
        # Remove the oldest connection
        sse.remove_client(existing[0].id)

    client, response = sse.add_client()
    sse.subscribe(client.id, f"user:{user}")
    return response


# --8<-- [end:client-limits]


# --8<-- [start:small-payloads]
def order_updated(sse: SSEService, order: dict[str, Any]) -> None:
    # Good - minimal data, the client fetches details if it needs them
    sse.broadcast(f"order:{order['id']}", "orderUpdated", {"orderId": order["id"], "status": order["status"]})
    # Bad - the full object, items and customer included, on every update


# --8<-- [end:small-payloads]
