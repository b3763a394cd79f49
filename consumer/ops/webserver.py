"""One aiohttp application served on ``host:port``, as an async context manager.

The ops server, the ChouetteCopro sandbox and the LSC document store all need the same lifecycle:
build the application, bind (port 0 picks a free port, read back from the runner), stop once.
``closing`` is set when the server stops, so slow or endless responses can end early.
"""

from __future__ import annotations

import asyncio
import socket
from types import TracebackType
from typing import Self

from aiohttp import web


class AppServer:
    """Subclasses build the application in ``build_app``; ``start``/``close`` are idempotent."""

    def __init__(self, *, host: str, port: int) -> None:
        self._host = host
        self._requested_port = port
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self.closing = asyncio.Event()

    def build_app(self) -> web.Application:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        if self._runner is not None:
            return
        runner = web.AppRunner(self.build_app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, self._host, self._requested_port).start()
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        self.closing.clear()

    async def close(self) -> None:
        self.closing.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._port


def listen_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on now (in use, no such address), or None.

    Checked before anything slow starts, so that a port in use is said at once rather than after
    Kafka and every partition. Port 0 (any free port) always works.
    """
    if port == 0:
        return None
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"{host} is not an address of this machine ({exc.strerror})"
    family, kind, proto, _, address = found[0]
    with socket.socket(family, kind, proto) as probe:
        # As the server will: a port left in TIME_WAIT by a stopped relay is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return f"port {port} on {host} is not free ({exc.strerror or exc})"
    return None
