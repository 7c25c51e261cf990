from fastapi import FastAPI, HTTPException, Request

from fastapi_sse import create_sse_router

# Which teams each user belongs to (your database answers this).
TEAMS = {"alice": {"red"}, "bob": {"blue"}}


# Demo sign-in: the user id comes from an X-User-Id header. Put your real
# authentication here (a verified session cookie or token).
def current_user(request: Request) -> str:
    user = request.headers.get("x-user-id")
    if not user or not user.isalnum():
        raise HTTPException(401, "sign in first")
    return user


def can_access_channel(request: Request, channel: str) -> bool:
    """Validate channel access: called for every ?channel= the client asks for."""
    user = current_user(request)
    kind, _, name = channel.partition(":")
    if kind == "team":
        return name in TEAMS.get(user, set())
    return channel in {"orders", "notifications"}


def user_channel(request: Request) -> list[str]:
    """Always subscribe the user's own channel (it needs no authorization)."""
    return [f"user:{current_user(request)}"]


app = FastAPI()
# GET /subscribe?channel=orders&channel=notifications opens one stream on all of them;
# a channel the user may not read answers 403 before the stream starts.
app.include_router(create_sse_router(authorize=can_access_channel, default_channels=user_channel))
