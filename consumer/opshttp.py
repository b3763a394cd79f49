"""The operations HTTP surface: probes, metrics, a status view and token-protected admin actions.

``/livez`` answers while the event loop runs and never depends on Kafka or the partner;
``/readyz`` is true once every assigned partition is restored and the relay is consuming, and
false again while the consumer group rebalances or the Kafka broker does not answer.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import SecretStr

from consumer.webserver import AppServer

log = logging.getLogger(__name__)


class RelayControl(Protocol):
    def is_ready(self) -> bool: ...
    def status(self) -> dict[str, Any]: ...
    def held(self) -> list[dict[str, Any]]: ...
    async def settle_held(
        self, agency_id: str, building_id: str, *, discard: bool, requested_by: str
    ) -> dict[str, Any]: ...


class OpsServer(AppServer):
    """The ops endpoints on the configured port; an async context manager."""

    def __init__(
        self,
        *,
        control: RelayControl,
        registry: CollectorRegistry,
        host: str,
        port: int,
        admin_token: SecretStr | None,
    ) -> None:
        super().__init__(host=host, port=port)
        self._control = control
        self._registry = registry
        self._token = admin_token

    def build_app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.get("/livez", self._livez),
                web.get("/readyz", self._readyz),
                web.get("/metrics", self._metrics),
                web.get("/status", self._status),
                web.get("/admin/held", self._list_held),
                web.post("/admin/held/{agency}/{building}/{action:release|discard}", self._settle),
            ]
        )
        return app

    async def start(self) -> None:
        await super().start()
        log.info("ops server listening", extra={"host": self.host, "port": self.port})

    async def _livez(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, _: web.Request) -> web.Response:
        ready = self._control.is_ready()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _status(self, _: web.Request) -> web.Response:
        return web.json_response(self._control.status())

    def _authorized(self, request: web.Request) -> bool:
        if self._token is None:
            return False
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {self._token.get_secret_value()}"
        return hmac.compare_digest(given.encode(), expected.encode())

    async def _list_held(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _forbidden(self._token is None)
        return web.json_response({"held": self._control.held()})

    async def _settle(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _forbidden(self._token is None)
        agency = request.match_info["agency"]
        building = request.match_info["building"]
        action = request.match_info["action"]
        queued = await self._control.settle_held(
            agency,
            building,
            discard=action == "discard",
            requested_by=f"http:{request.remote or 'unknown'}",
        )
        log.warning(
            "operator command queued",
            extra={"agency": agency, "building": building, "action": action, **queued},
        )
        return web.json_response(
            {"agency": agency, "building": building, "action": action, **queued}, status=202
        )


def _forbidden(disabled: bool) -> web.Response:
    detail = (
        "admin actions are disabled: set CHOUETTE_RELAY_HTTP__ADMIN_TOKEN_FILE"
        if disabled
        else "missing or wrong bearer token"
    )
    return web.json_response({"error": detail}, status=403 if disabled else 401)
