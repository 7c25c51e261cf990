from typing import Any

from fastapi_sse import SSEClient, SSEService, Text


async def publish_everywhere(sse: SSEService, client: SSEClient, order: dict[str, Any]) -> str:
    sse.broadcast("user:42", "notification", {"message": "hi"})  # one channel, every worker
    sse.broadcast_all("announcement", {"title": "Deploy at 6pm"})  # every client
    sse.send_to(client.id, "initialState", {"unread": 3})  # one connection
    sse.broadcast("logs", "line", Text("sent as is, not as JSON"))
    return await sse.publish("orders", "newOrder", order)  # the event's id, once stored
