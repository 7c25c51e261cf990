"""The example app's typed events: each is validated when published, listed in the
subscribe route's OpenAPI response (``/docs``) and in the AsyncAPI document
(``GET /sse/asyncapi.json``)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from fastapi_sse import EventTypes

events = EventTypes()


@events.event("notification", channels="user:{user_id}")
class Notification(BaseModel):
    """A new notification for the signed-in user."""

    id: int
    title: str
    body: str
    type: str
    created_at: str = Field(alias="createdAt", description="ISO 8601, UTC")


@events.event("unreadCount", channels="user:{user_id}")
class UnreadCount(BaseModel):
    """How many of the user's notifications are unread."""

    count: int = Field(ge=0)


@events.event("taskProgress", channels="user:{user_id}")
class TaskProgress(BaseModel):
    """One more item of a background task is done."""

    task_id: str = Field(alias="taskId")
    current: int = Field(ge=0)
    total: int = Field(ge=0)
    percent: int = Field(ge=0, le=100)


@events.event("taskComplete", channels="user:{user_id}")
class TaskComplete(BaseModel):
    """A background task has finished."""

    task_id: str = Field(alias="taskId")
    result: str
