"""The HTTP listeners of the long-running front ends (``serve``, ``consume``):
FastAPI apps on uvicorn, all on one asyncio loop in a background thread.

Sockets are bound when an app is added, so an address in use is one plain
error before anything has started. Each listener bounds what a client can
hold before authentication, as the Collector's confighttp does: at most
``max_connections`` open connections (past it a new one is closed at once),
and a request's headers must arrive within ``read_timeout`` of the
connection opening or the previous response ending (uvicorn times out only
idle keep-alive connections); the receiver bounds the body itself.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from traceguard.config import split_address
from traceguard.metrics import Metrics


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with the connection cap and the header deadline."""

    max_connections = 1024
    read_timeout_s = 30.0
    metrics: Metrics | None = None
    listener = ""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._deadline = None
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._count("traceguard_connections_refused_total")
            transport.abort()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting():
            if self._deadline is None:
                self._arm()
        elif self._deadline is not None:  # a request's headers are in: the body has its own deadline
            self._deadline.cancel()
            self._deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def _waiting(self) -> bool:
        return self.cycle is None or self.cycle.response_complete or self.conn.their_state is h11.IDLE

    def _arm(self) -> None:
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.read_timeout_s, self._too_slow)

    def _too_slow(self) -> None:
        self._deadline = None
        if self._waiting() and not self.transport.is_closing():
            self._count("traceguard_connections_timed_out_total")
            self.transport.abort()

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            self.metrics.inc(name, listener=self.listener)


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
    def __init__(self, max_connections: int, read_timeout_s: float, metrics: Metrics) -> None:
        self._servers: list[uvicorn.Server] = []
        self._sockets: list[socket.socket] = []
        self._thread: threading.Thread | None = None
        self._limits = {"max_connections": max_connections, "read_timeout_s": read_timeout_s, "metrics": metrics}

    def add(self, app, address: str, tls_cert: Path | None = None, tls_key: Path | None = None,
            name: str = "http") -> int:
        """Binds ``address`` for ``app`` now; returns the port bound (``:0`` picks a free one).
        ``name`` labels the listener's refused and timed-out connections."""
        sock = bind(address)
        options = {"ssl_certfile": str(tls_cert), "ssl_keyfile": str(tls_key)} if tls_cert else {}
        protocol = type("GuardedH11", (_GuardedH11,), {**self._limits, "listener": name})
        self._servers.append(uvicorn.Server(uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", http=protocol, **options)))
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
