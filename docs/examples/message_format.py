from fastapi import FastAPI

from fastapi_sse import SSEDep, SSEResponse, SSEService, sse_lifespan


def send_hello(sse: SSEService, client_id: str) -> bool:
    return sse.send_to(client_id, "notification", {"message": "Hello"}, "msg-123")


app = FastAPI(lifespan=sse_lifespan())


@app.get("/hello", response_class=SSEResponse)
async def hello(sse: SSEDep) -> SSEResponse:
    client, response = sse.add_client()
    send_hello(sse, client.id)
    return response
