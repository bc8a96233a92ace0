"""The HTTP listeners of the long-running front ends (``serve``, ``consume``):
FastAPI apps on uvicorn, all on one asyncio loop in a background thread.

Sockets are bound when an app is added, so an address in use is one plain
error before anything has started.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import uvicorn

from traceguard.config import split_address


def bind(address: str) -> socket.socket:
    host, port = split_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {address}: {exc.strerror}") from None
    sock.listen(128)
    return sock


class HttpServers:
    def __init__(self) -> None:
        self._servers: list[uvicorn.Server] = []
        self._sockets: list[socket.socket] = []
        self._thread: threading.Thread | None = None

    def add(self, app, address: str, tls_cert: Path | None = None, tls_key: Path | None = None) -> int:
        """Binds ``address`` for ``app`` now; returns the port bound (``:0`` picks a free one)."""
        sock = bind(address)
        options = {"ssl_certfile": str(tls_cert), "ssl_keyfile": str(tls_key)} if tls_cert else {}
        self._servers.append(uvicorn.Server(uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", **options)))
        self._sockets.append(sock)
        return sock.getsockname()[1]

    def start(self, timeout_s: float = 30) -> None:
        """Serves every added app; returns once all listen.

        Raises:
            RuntimeError: they did not start within ``timeout_s``.
        """
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not all(server.started for server in self._servers):
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the HTTP listeners did not start")
            time.sleep(0.01)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.run_until_complete(asyncio.gather(*(
            server.serve(sockets=[sock]) for server, sock in zip(self._servers, self._sockets))))
        loop.close()

    def stop(self, timeout_s: float) -> None:
        for server in self._servers:
            server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        for sock in self._sockets:
            sock.close()
