import httpx
from fastapi import FastAPI

from fastapi_sse import SSEDep, allow_all, create_sse_router
from fastapi_sse.testing import live_server, open_event_stream

# The app under test; yours comes from your own package.
app = FastAPI()
app.include_router(create_sse_router(authorize=allow_all))


@app.post("/orders/{order_id}/ship")
async def ship(order_id: str, sse: SSEDep) -> None:
    sse.broadcast(f"order:{order_id}", "orderShipped", {"orderId": order_id})


def test_order_shipped_reaches_the_subscriber() -> None:
    with (
        live_server(app) as url,
        open_event_stream(url + "/subscribe", params={"channel": "order:17"}) as events,
    ):
        # The stream is subscribed once open_event_stream returns: publish now.
        httpx.post(url + "/orders/17/ship")
        # Wait by reading: the client's read timeout is the deadline.
        assert events.next_event("orderShipped").json() == {"orderId": "17"}
