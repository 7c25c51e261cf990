"""The router's hooks, and how they become FastAPI dependencies.

Each hook of :func:`create_sse_router` is resolved by FastAPI's dependency injection,
so a hook may declare what it needs the way a route does: ``Depends(...)``,
``Security(..., scopes=[...])``, ``Header(...)``, the ``Request``. What the router
itself provides is passed by parameter name or type:

- ``authorize``: the parameter named ``channel`` (one call per requested channel);
- ``on_connect``: a parameter typed :class:`SSEClient` (or named ``client``) and one
  typed :class:`SSEService` (or named ``sse``).

The older plain forms keep working: ``authorize(request, channel)``,
``identify(request)``, ``default_channels(request)`` and
``on_connect(request, client, sse)`` with parameters left unannotated are called
positionally. ``identify`` and ``default_channels`` take nothing from the router, so
they are used as dependencies themselves, and ``app.dependency_overrides[hook]``
replaces them in tests; ``authorize`` and ``on_connect`` are overridden through the
dependencies they declare.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeAlias, TypeVar

from fastapi import Depends, Request

T = TypeVar("T")
MaybeAwaitable: TypeAlias = T | Awaitable[T]

Authorize: TypeAlias = typing.Callable[..., MaybeAwaitable[bool]]  # typing's form takes a docstring
"""Decides whether the request may read one channel: ``authorize(request, channel)``,
or any callable with a ``channel`` parameter and FastAPI dependencies for the rest,
e.g. ``def can_read(channel: str, user: Annotated[User, Depends(current_user)]) -> bool``."""
Authorize.__doc__ = """Decides whether the request may read one channel: ``authorize(request, channel)``,
or any callable with a ``channel`` parameter and FastAPI dependencies for the rest,
e.g. ``def can_read(channel: str, user: Annotated[User, Depends(current_user)]) -> bool``."""

Identify: TypeAlias = typing.Callable[..., MaybeAwaitable[str | None]]  # typing's form takes a docstring
"""Names the identity (e.g. the user id) for ``max_connections_per_identity``: a
FastAPI dependency returning ``str | None``, or ``identify(request)``."""
Identify.__doc__ = """Names the identity (e.g. the user id) for ``max_connections_per_identity``: a
FastAPI dependency returning ``str | None``, or ``identify(request)``."""

DefaultChannels: TypeAlias = typing.Callable[..., MaybeAwaitable[Collection[str]]]  # typing's form takes a docstring
"""Channels always subscribed, without authorization (e.g. ``user:{id}``): a FastAPI
dependency returning a collection of names, or ``default_channels(request)``."""
DefaultChannels.__doc__ = """Channels always subscribed, without authorization (e.g. ``user:{id}``): a FastAPI
dependency returning a collection of names, or ``default_channels(request)``."""

OnConnect: TypeAlias = typing.Callable[..., MaybeAwaitable[None]]  # typing's form takes a docstring
"""Runs once the stream is subscribed, before it starts (e.g. to ``send_to`` the initial
state): ``on_connect(request, client, sse)``, or a callable with ``client: SSEClient``
and ``sse: SSEService`` parameters and FastAPI dependencies for the rest."""
OnConnect.__doc__ = """Runs once the stream is subscribed, before it starts (e.g. to ``send_to`` the initial
state): ``on_connect(request, client, sse)``, or a callable with ``client: SSEClient``
and ``sse: SSEService`` parameters and FastAPI dependencies for the rest."""

Bound: TypeAlias = Callable[..., Awaitable[Any]]


async def call(value: MaybeAwaitable[T]) -> T:
    """The value, awaited when it is awaitable (hooks may be sync or async)."""
    if inspect.isawaitable(value):
        result: T = await value
        return result
    return value


def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(fn, eval_str=True)
    except (NameError, TypeError):
        return inspect.signature(fn)


def _provided_key(param: inspect.Parameter, position: int, legacy: tuple[str, ...], provided: dict[str, type]) -> str:
    """What the router passes to this parameter: a key of ``provided``, ``request``, or
    "" when FastAPI resolves it."""
    annotation = param.annotation
    if annotation is inspect.Parameter.empty:
        if param.name in provided or param.name == "request":
            return param.name
        if position < len(legacy) and param.default is inspect.Parameter.empty:
            return legacy[position]
        return ""
    if isinstance(annotation, type):
        if issubclass(annotation, Request):
            return "request"
        for key, kind in provided.items():
            if issubclass(annotation, kind):
                return key
    if param.name in provided and (annotation is str or annotation == "str"):
        return param.name
    return ""


def dependency(
    hook: Callable[..., Any], *, legacy: tuple[str, ...], provided: dict[str, type]
) -> Callable[..., Awaitable[Bound]]:
    """A FastAPI dependency that resolves what ``hook`` declares and returns a coroutine
    function taking the router's ``provided`` values by key."""
    signature = _signature(hook)
    resolved: list[inspect.Parameter] = []
    passed: dict[str, str] = {}  # hook parameter -> provided key
    for position, param in enumerate(signature.parameters.values()):
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise TypeError(f"hook {hook!r} takes *args or **kwargs; name each parameter it needs")
        key = _provided_key(param, position, legacy, provided)
        if key == "request":
            resolved.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=Request))
        elif key:
            passed[param.name] = key
        else:
            resolved.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))

    async def resolve(**values: Any) -> Bound:
        async def bound(**given: Any) -> Any:
            return await call(hook(**values, **{name: given[key] for name, key in passed.items()}))

        return bound

    resolve.__signature__ = inspect.Signature(resolved)  # type: ignore[attr-defined]
    return resolve


def as_value_dependency(hook: Callable[..., Any], *, legacy: tuple[str, ...]) -> Callable[..., Any]:
    """``hook`` itself when FastAPI can resolve every parameter (so
    ``app.dependency_overrides[hook]`` works), else a wrapper for the plain form."""
    signature = _signature(hook)
    if all(
        _provided_key(param, position, legacy, {}) in ("", "request")
        and param.annotation is not inspect.Parameter.empty
        for position, param in enumerate(signature.parameters.values())
    ):
        return hook
    bind = dependency(hook, legacy=legacy, provided={})

    async def value(bound: Bound = Depends(bind)) -> Any:
        return await bound()

    return value


__all__ = ["Authorize", "DefaultChannels", "Identify", "OnConnect"]
