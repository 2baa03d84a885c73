"""A real, throw-away ``redis-server`` for the Redis queue's tests.

:func:`start_redis` starts one on 127.0.0.1 on a free port with its ``--dir`` in a temporary
folder (no persistence unless ``appendonly``), waits until it answers PING and returns a
:class:`RedisServer` (``url``, ``stop()``, ``restart()``). The fixture :func:`redis_url`
(module scope) yields the URL of one. :func:`require_redis` skips the calling test module with
a clear reason when ``redis-server`` or the ``rq`` / ``redis`` packages are absent.

Import the fixture by name into a test module (``from redis_server import redis_url``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

#: The server binary: ``UUMAMBA_REDIS_SERVER`` or ``redis-server`` on PATH (Debian: /usr/bin).
REDIS_SERVER = os.environ.get("UUMAMBA_REDIS_SERVER") or shutil.which("redis-server") or (
    "/usr/bin/redis-server" if Path("/usr/bin/redis-server").is_file() else None)


def require_redis() -> None:
    """Skip the calling module unless a ``redis-server`` binary and the ``rq`` and ``redis``
    packages are available."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server not found (apt-get install redis-server, or set "
                    "UUMAMBA_REDIS_SERVER): the Redis queue tests need a real server",
                    allow_module_level=True)
    for package in ("redis", "rq"):
        try:
            __import__(package)
        except ImportError:
            pytest.skip(f"the {package!r} package is not installed (pip install rq): needed by "
                        "the Redis queue (uumamba worker --broker)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One ``redis-server`` process bound to 127.0.0.1 (see :func:`start_redis`)."""

    def __init__(self, folder: Path, appendonly: bool = False) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server (same port and folder as before) and wait for PING."""
        import redis

        args = [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port),
                "--dir", str(self.folder), "--save", "", "--daemonize", "no",
                "--protected-mode", "yes", "--maxmemory-policy", "noeviction",
                "--appendonly", "yes" if self.appendonly else "no"]
        if self.appendonly:
            args += ["--appendfsync", "always"]
        self.proc = subprocess.Popen(args, stdout=(self.folder / "redis.log").open("ab"),
                                     stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except redis.exceptions.ConnectionError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > end:
                    log = (self.folder / "redis.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer PING on port {self.port}:\n{log}")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()


def start_redis(folder: Path, appendonly: bool = False) -> RedisServer:
    """A started :class:`RedisServer` with its data folder ``folder``."""
    require_redis()
    return RedisServer(folder, appendonly=appendonly).start()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """URL of a fresh ``redis-server`` for the module (no persistence), stopped after it."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()
