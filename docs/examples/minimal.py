from fastapi import FastAPI

from fastapi_sse import SSEDep, allow_all, create_sse_router

app = FastAPI()
# GET /subscribe?channel=order:17 opens a stream; the router runs the service.
# allow_all lets anyone read any channel: for public data only (see Channels).
app.include_router(create_sse_router(authorize=allow_all))


@app.post("/orders/{order_id}/ship")
async def ship(order_id: str, sse: SSEDep) -> None:
    sse.broadcast(f"order:{order_id}", "orderShipped", {"orderId": order_id})
