from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException
from pydantic import BaseModel

from fastapi_sse import SSEClient, SSEDep, SSEService, create_sse_router


class User(BaseModel):
    name: str
    teams: list[str]


# A stand-in for your authentication: "Authorization: Bearer <name>".
USERS = {"alice": User(name="alice", teams=["red"]), "bob": User(name="bob", teams=["blue"])}


async def current_user(authorization: Annotated[str | None, Header()] = None) -> User:
    user = USERS.get((authorization or "").removeprefix("Bearer "))
    if user is None:
        raise HTTPException(401, "sign in first")
    return user


CurrentUser = Annotated[User, Depends(current_user)]


async def user_id(user: CurrentUser) -> str:
    """identify: the per-user connection limit counts this user's streams."""
    return user.name


async def own_channel(user: CurrentUser) -> list[str]:
    """default_channels: the user's private channel, subscribed without a check."""
    return [f"user:{user.name}"]


def can_read(channel: str, user: CurrentUser) -> bool:
    """authorize: called once per ?channel=, with the user FastAPI resolved."""
    kind, _, team = channel.partition(":")
    return kind == "team" and team in user.teams


def initial_state(client: SSEClient, sse: SSEService, user: CurrentUser) -> None:
    """on_connect: the stream is subscribed and about to start."""
    sse.send_to(client.id, "hello", {"name": user.name, "teams": user.teams})


app = FastAPI()
app.include_router(
    create_sse_router(authorize=can_read, identify=user_id, default_channels=own_channel, on_connect=initial_state)
)


@app.post("/teams/{team}/messages")
async def post_message(team: str, text: str, user: CurrentUser, sse: SSEDep) -> dict[str, str]:
    if team not in user.teams:
        raise HTTPException(403, "not your team")
    sse.broadcast(f"team:{team}", "message", {"from": user.name, "text": text})
    return {"status": "sent"}
