"""A stand-in for your authentication: the user id comes from an ``X-User-Id`` header.

A real app verifies a session cookie or a token here; the examples only need a user id.
"""

from typing import Annotated

from fastapi import Depends, HTTPException, Request


def current_user(request: Request) -> str:
    user = request.headers.get("x-user-id")
    if not user or not user.isalnum():
        raise HTTPException(401, "sign in first")
    return user


CurrentUser = Annotated[str, Depends(current_user)]
