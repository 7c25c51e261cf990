"""Serve the app on a listening socket that notices vanished peers.

An SSE client sends nothing after its request, so when it vanishes without closing
(Wi-Fi dropped, laptop shut, a NAT forgot it) the server only learns it from TCP:
writes go unacknowledged and the kernel retransmits them for about fifteen minutes
before it gives up. Until then the stream holds its slot, its buffer and its memory.
``TCP_USER_TIMEOUT`` bounds that: a connection whose sent data stays unacknowledged
for that long is closed, and the stream ends as any disconnect does. Heartbeats
(``heartbeat_interval``) make sure an idle stream has data in flight to time out.

Socket options set on a listening socket are inherited by the connections it
accepts (Linux), so one socket made here covers every stream::

    sock = listening_socket("0.0.0.0", 8000, user_timeout=30)
    uvicorn.Server(uvicorn.Config(app)).run(sockets=[sock])

or ``serve(app, host="0.0.0.0", port=8000)``. A process manager that passes uvicorn a
ready socket (``uvicorn --fd``) can create it the same way.
"""

from __future__ import annotations

import socket
from typing import Any


def listening_socket(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    user_timeout: float = 30.0,
    keepalive: float | None = 15.0,
    backlog: int = 2048,
) -> socket.socket:
    """A bound, listening TCP socket whose connections are closed when the peer has not
    acknowledged sent data for ``user_timeout`` seconds, and, with ``keepalive``, probed
    after that many idle seconds (three probes, that many seconds apart)."""
    if user_timeout <= 0:
        raise ValueError(f"user_timeout must be positive, got {user_timeout!r}")
    if not hasattr(socket, "TCP_USER_TIMEOUT"):
        raise OSError("TCP_USER_TIMEOUT is not available on this platform (it is Linux's)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, round(user_timeout * 1000)))
        if keepalive is not None:
            seconds = max(1, round(keepalive))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, seconds)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, seconds)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    user_timeout: float = 30.0,
    keepalive: float | None = 15.0,
    **config: Any,
) -> None:
    """Run ``app`` under uvicorn (one process) on :func:`listening_socket`; other keyword
    arguments go to ``uvicorn.Config``."""
    import uvicorn  # the server extra

    sock = listening_socket(host, port, user_timeout=user_timeout, keepalive=keepalive)
    try:
        uvicorn.Server(uvicorn.Config(app, **config)).run(sockets=[sock])
    finally:
        sock.close()


__all__ = ["listening_socket", "serve"]
