"""A peer that vanishes without closing (no FIN, no RST) is let go within
``TCP_USER_TIMEOUT``, not after the kernel's minutes of retransmissions: a real client
in a network namespace of the test's own, whose link is then cut."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn
from helpers.apps import fast_settings, router_app
from helpers.streams import wait_until

from fastapi_sse import get_sse_from_app
from fastapi_sse.serving import listening_socket

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 for a network namespace"
)

CLIENT = """
import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
sock.sendall(b"GET /subscribe?channel=far HTTP/1.1\\r\\nHost: x\\r\\nAccept: text/event-stream\\r\\n\\r\\n")
head = b""
while b"retry: " not in head:
    head += sock.recv(4096)
print("open", flush=True)
sys.stdin.read()
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextmanager
def far_host() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to this one by a veth pair: (namespace, its link,
    the address of this side)."""
    tag = uuid.uuid4().hex[:6]
    ns, here, there = f"sse-{tag}", f"vs{tag}", f"vp{tag}"
    ip("netns", "add", ns)
    try:
        ip("link", "add", here, "type", "veth", "peer", "name", there)
        ip("link", "set", there, "netns", ns)
        ip("addr", "add", "10.251.7.1/30", "dev", here)
        ip("link", "set", here, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", "10.251.7.2/30", "dev", there)
        ip("netns", "exec", ns, "ip", "link", "set", there, "up")
        yield ns, there, "10.251.7.1"
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_a_vanished_peer_is_let_go_within_the_user_timeout() -> None:
    app = router_app(fast_settings(heartbeat_interval=0.2))
    with far_host() as (ns, link, address):
        sock = listening_socket(address, 0, user_timeout=1.0, keepalive=None)
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        client = None
        try:
            wait_until(lambda: server.started, message="the server to start")
            client = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, address, str(port)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert client.stdout is not None and client.stdout.readline().strip() == "open"
            sse = get_sse_from_app(app)
            assert len(sse.get_clients()) == 1
            # The far host drops off the network: nothing it could send reaches us.
            ip("netns", "exec", ns, "ip", "link", "set", link, "down")
            # Heartbeats stay unacknowledged; after about a second the kernel gives up.
            wait_until(lambda: not sse.get_clients(), timeout=15, message="the vanished stream to be let go")
            assert sse.stats().disconnects == {"client_closed": 1}
        finally:
            if client is not None:
                client.kill()
                client.wait(10)
                for pipe in (client.stdin, client.stdout):
                    if pipe is not None:
                        pipe.close()
            server.should_exit = True
            thread.join(15)
            sock.close()


def test_the_socket_carries_the_options_its_connections_inherit() -> None:
    sock = listening_socket("127.0.0.1", 0, user_timeout=2.5, keepalive=7)
    with sock, socket.create_connection(sock.getsockname()) as peer:
        accepted, _ = sock.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 2500
            assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
        assert peer.fileno() > 0
    with pytest.raises(ValueError, match="user_timeout must be positive"):
        listening_socket("127.0.0.1", 0, user_timeout=0)
