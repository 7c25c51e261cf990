import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from fastapi_sse import SSEDep, SSEResponse, get_sse_from_app, sse_lifespan

STATS_INTERVAL = 30.0  # seconds, like a "*/30 * * * * *" cron job
orders: list[dict[str, Any]] = []  # stands in for the orders table


def get_dashboard_stats() -> dict[str, Any]:
    return {"orders": len(orders), "revenue": sum(o["total"] for o in orders)}


async def publish_stats_periodically(app: FastAPI) -> None:
    while True:
        await asyncio.sleep(STATS_INTERVAL)
        get_sse_from_app(app).broadcast("dashboard:stats", "statsUpdate", get_dashboard_stats())


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with sse_lifespan()(app):
        task = asyncio.create_task(publish_stats_periodically(app))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


app = FastAPI(lifespan=lifespan)


# Subscribe to dashboard updates
@app.get("/dashboard/live", response_class=SSEResponse)
async def dashboard_live(sse: SSEDep) -> SSEResponse:
    client, response = sse.add_client()

    sse.subscribe(client.id, "dashboard:stats")
    sse.subscribe(client.id, "dashboard:orders")
    sse.subscribe(client.id, "dashboard:alerts")

    # Send the initial data
    sse.send_to(client.id, "initialData", get_dashboard_stats())

    return response


class Order(BaseModel):
    total: float
    customer_name: str


# Update every dashboard viewer when data changes
@app.post("/orders", status_code=201)
async def create_order(order: Order, sse: SSEDep) -> dict[str, Any]:
    saved = {"id": len(orders) + 1, **order.model_dump()}
    orders.append(saved)
    sse.broadcast(
        "dashboard:orders", "newOrder", {"id": saved["id"], "total": order.total, "customer": order.customer_name}
    )
    return saved
