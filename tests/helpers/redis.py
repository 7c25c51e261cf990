"""A private redis-server on a loopback port, in its own process."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass

from .servers import free_port, wait_for_port


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes]
    dir: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def start_redis(port: int | None = None, data_dir: str | None = None, *options: str) -> RedisServer:
    """Start a private redis-server; ``options`` are extra config arguments
    (``"--appendonly", "yes"`` to keep data across a restart, ``"--requirepass", "pw"``)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed: run 'make install' (apt-get install redis-server)")
    port = port or free_port()
    data_dir = data_dir or tempfile.mkdtemp(prefix="sse-redis-")
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", data_dir]
    proc = subprocess.Popen(
        [*args, *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, proc=proc)
    return RedisServer(port, proc, data_dir)
