import itertools
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel

from fastapi_sse import SSEDep, SSEService, create_sse_router


# Demo sign-in: the user id comes from an X-User-Id header. Put your real
# authentication here (a verified session cookie or token).
def current_user(request: Request) -> str:
    user = request.headers.get("x-user-id")
    if not user or not user.isalnum():
        raise HTTPException(401, "sign in first")
    return user


CurrentUser = Annotated[str, Depends(current_user)]


def user_channel(request: Request) -> list[str]:
    """Each stream gets its own user's channel, from the sign-in (never from the query)."""
    return [f"user:{current_user(request)}"]


def no_other_channel(request: Request, channel: str) -> bool:
    """A ?channel= beyond the user's own is refused (HTTP 403)."""
    return False


class NotificationData(BaseModel):
    title: str
    body: str
    type: str = "info"


class NotificationService:
    """Stores notifications (here in memory) and pushes them in real time."""

    def __init__(self, sse: SSEService, rows: list[dict[str, Any]]) -> None:
        self.sse = sse
        self.rows = rows

    def create(self, user_id: str, notification: NotificationData) -> dict[str, Any]:
        # Save to the database
        saved = {
            "id": next(notification_ids),
            "user_id": user_id,
            **notification.model_dump(),
            "read": False,
            "created_at": datetime.now(UTC).isoformat(),
        }
        self.rows.append(saved)

        # Push to the user in real time
        self.sse.broadcast(
            f"user:{user_id}",
            "notification",
            {
                "id": saved["id"],
                "title": notification.title,
                "body": notification.body,
                "type": notification.type,
                "createdAt": saved["created_at"],
            },
        )
        return saved

    def mark_as_read(self, user_id: str, notification_id: int) -> None:
        for row in self.rows:
            if row["id"] == notification_id and row["user_id"] == user_id:
                row["read"] = True

        # Update the badge count in real time
        unread_count = sum(1 for row in self.rows if row["user_id"] == user_id and not row["read"])
        self.sse.broadcast(f"user:{user_id}", "unreadCount", {"count": unread_count})


rows: list[dict[str, Any]] = []  # stands in for the notifications table
notification_ids = itertools.count(1)


def get_notifications(sse: SSEDep) -> NotificationService:
    return NotificationService(sse, rows)


Notifications = Annotated[NotificationService, Depends(get_notifications)]

app = FastAPI()
# GET /subscribe opens a stream on the signed-in user's channel.
app.include_router(create_sse_router(authorize=no_other_channel, default_channels=user_channel))


@app.post("/notifications")
async def create(body: NotificationData, notifications: Notifications, user: CurrentUser) -> dict[str, Any]:
    return notifications.create(user, body)


@app.post("/notifications/{notification_id}/read")
async def mark_as_read(notification_id: int, notifications: Notifications, user: CurrentUser) -> None:
    notifications.mark_as_read(user, notification_id)
