"""The operations HTTP surface: probes, metrics, a status view and token-protected admin actions.

``/livez`` answers while the event loop runs and never depends on Kafka or the partner;
``/readyz`` is true once every assigned partition is restored and the relay is consuming, and
false again while the consumer group rebalances or the Kafka broker does not answer.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson
from aiohttp import HttpVersion11, hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import SecretStr, ValidationError

from consumer.core.commands import AgencyAction
from consumer.errors import PartnerError
from consumer.ops.admin import NO_SUCH_DEAD_LETTER, Operator, PlanChangedError, UnknownTargetError
from consumer.ops.dryrun import plan_json
from consumer.ops.overview import add_replica_status, gather
from consumer.ops.webserver import AppServer

log = logging.getLogger(__name__)


class RelayControl(Protocol):
    def is_ready(self) -> bool: ...
    def status(self) -> dict[str, Any]: ...
    def held(self) -> list[dict[str, Any]]: ...
    async def settle_held(
        self, agency_id: str, building_id: str, *, discard: bool, requested_by: str
    ) -> dict[str, Any]: ...
    def operator(self) -> Operator: ...
    async def audit(
        self, agency_id: str, *, building_id: str | None, repair: bool, requested_by: str
    ) -> dict[str, Any]: ...


Handler = Callable[[web.Request], Awaitable[web.Response]]


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
        routes = [
            web.get("/livez", self._livez),
            web.get("/readyz", self._readyz),
            web.get("/metrics", self._metrics),
            web.get("/status", self._status),
            web.get("/admin/status", self._admin(self._status)),  # `status --replica`
            web.get("/admin/held", self._admin(self._list_held)),
            web.post(
                "/admin/held/{agency}/{building}/{action:release|discard}",
                self._admin(self._settle),
            ),
            web.post("/admin/agencies/{agency}/{action:pause|resume}", self._admin(self._agency)),
            web.get("/admin/plan", self._admin(self._plan)),
            web.post("/admin/agencies/{agency}/approve", self._admin(self._approve)),
            web.get("/admin/overview", self._admin(self._overview)),
            web.get("/admin/audit", self._admin(self._audit)),
            web.post("/admin/audit/repair", self._admin(self._audit)),
            web.get("/admin/parked", self._admin(self._list_parked)),
            web.post("/admin/parked/{agency}/retry", self._admin(self._retry)),
            web.post("/admin/parked/{agency}/{building}/retry", self._admin(self._retry)),
            web.get("/admin/dead-letters", self._admin(self._list_dead_letters)),
            web.post("/admin/dead-letters/replay", self._admin(self._replay)),
            # Last: what no route above takes (also a known path with another method), so that
            # an unmatched request's Expect header is answered by _expect too.
            web.route("*", "/{tail:.*}", _no_route),
        ]
        # Every route answers an Expect header itself (see _expect).
        app.add_routes(
            web.route(r.method, r.path, r.handler, **{**r.kwargs, "expect_handler": _expect})
            for r in routes
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
        try:
            # Bytes that are not UTF-8 reach here as surrogates: a malformed header, not a token.
            given = request.headers.get("Authorization", "").encode()
        except UnicodeEncodeError:
            return False
        expected = f"Bearer {self._token.get_secret_value()}"
        return hmac.compare_digest(given, expected.encode())

    async def _list_held(self, _: web.Request) -> web.Response:
        return web.json_response({"held": self._control.held()})

    async def _settle(self, request: web.Request) -> web.Response:
        agency = request.match_info["agency"]
        building = request.match_info["building"]
        action = request.match_info["action"]
        queued = await self._control.settle_held(
            agency,
            building,
            discard=action == "discard",
            requested_by=f"http:{request.remote or 'unknown'}",
        )
        log.info(
            "operator command queued",
            extra={"agency": agency, "building": building, "action": action, **queued},
        )
        return web.json_response(
            {"agency": agency, "building": building, "action": action, **queued}, status=202
        )

    def _admin(self, handler: Handler) -> Handler:
        """``handler`` behind the bearer token. Input never makes a 500: an agency or building
        the routing file does not know is a 404 (as Kafka Connect answers for an unknown
        connector), the plan changed since it was shown a 409, any other refusal a 400."""

        async def guarded(request: web.Request) -> web.Response:
            if not self._authorized(request):
                return _forbidden(self._token is None)
            try:
                return await handler(request)
            except (ValueError, PartnerError) as exc:  # pydantic's ValidationError included
                return _refused(exc)

        return guarded

    async def _agency(self, request: web.Request) -> web.Response:
        action = AgencyAction(request.match_info["action"])
        # ?scope=backfill pauses the first publication alone; live documents keep flowing.
        scope = request.query.get("scope", "live_and_backfill")
        if scope not in ("live_and_backfill", "backfill"):
            raise ValueError("scope is live_and_backfill or backfill")
        if scope == "backfill" and action is not AgencyAction.PAUSE:
            raise ValueError("a scope goes with pause only: resume ends either")
        queued = await self._control.operator().queue(
            action,
            request.match_info["agency"],
            requested_by=_requester(request),
            backfill_only=scope == "backfill",
        )
        log.info("operator command queued", extra=queued)
        return web.json_response(queued, status=202)

    async def _plan(self, request: web.Request) -> web.Response:
        agency = self._agency_filter(request)
        plan, fingerprints, shares = await self._control.operator().plan_with_shares(agency)
        return web.json_response(plan_json(plan, fingerprints, shares))

    async def _approve(self, request: web.Request) -> web.Response:
        """Body: ``{"plan": "<fingerprint shown by the plan>"}``; 409 if the plan changed."""
        body = await _json_body(request)
        plan = body.get("plan")
        if not isinstance(plan, str):
            raise ValueError('the body is {"plan": "<fingerprint>"}')  # noqa: TRY004 - a 400
        queued = await self._control.operator().approve(
            request.match_info["agency"], plan, requested_by=_requester(request)
        )
        log.info("operator command queued", extra=queued)
        return web.json_response(queued, status=202)

    async def _audit(self, request: web.Request) -> web.Response:
        """``?agency=ID[&building=B]``; POST to ``/admin/audit/repair`` queues the repairs."""
        agency = self._agency_filter(request)
        if agency is None:
            raise ValueError("name the agency: ?agency=ID")
        building = request.query.get("building")
        self._control.operator().check_target(agency, building)
        report = await self._control.audit(
            agency,
            building_id=building,
            repair=request.method == "POST",
            requested_by=_requester(request),
        )
        return web.json_response(report, status=202 if "repairs" in report else 200)

    async def _overview(self, request: web.Request) -> web.Response:
        """What ``chouette-relay status --json`` prints, with this replica's own status added."""
        found = await gather(self._control.operator(), agency=self._agency_filter(request))
        add_replica_status(found, self._control.status())
        return web.json_response({name: entry.plain() for name, entry in found.items()})

    async def _list_parked(self, request: web.Request) -> web.Response:
        parked = await self._control.operator().parked(self._agency_filter(request))
        return web.json_response({"parked": parked})

    async def _retry(self, request: web.Request) -> web.Response:
        queued = await self._control.operator().queue(
            AgencyAction.RETRY,
            request.match_info["agency"],
            request.match_info.get("building"),
            requested_by=_requester(request),
        )
        log.info("operator command queued", extra=queued)
        return web.json_response(queued, status=202)

    async def _list_dead_letters(self, request: web.Request) -> web.Response:
        letters = await self._control.operator().dead_letters(
            reason=request.query.get("reason"), source_topic=request.query.get("source_topic")
        )
        return web.json_response({"dead_letters": letters})

    async def _replay(self, request: web.Request) -> web.Response:
        """Body: ``{"ids": ["topic/partition/offset", ...], "reason": ..., "force": false}``."""
        body = await _json_body(request)
        ids, reason, force = body.get("ids", []), body.get("reason"), body.get("force", False)
        valid = (
            isinstance(ids, list)
            and all(isinstance(i, str) for i in ids)
            and isinstance(force, bool)
            and isinstance(reason, str | None)
        )
        if not valid:
            raise ValueError(
                'the body is {"ids": ["topic/partition/offset", ...], "reason": "...", '
                '"force": false}'
            )
        results = await self._control.operator().replay(ids, reason=reason, force=force)
        if ids and all(r.get("why") == NO_SUCH_DEAD_LETTER for r in results):
            answer = {"error": NO_SUCH_DEAD_LETTER, "replayed": results}
            return web.json_response(answer, status=404)
        log.warning("dead letters replayed", extra={"results": results, "by": _requester(request)})
        return web.json_response({"replayed": results})

    def _agency_filter(self, request: web.Request) -> str | None:
        """The ``?agency=`` of a listing, which must be an agency of the routing file."""
        agency = request.query.get("agency")
        if agency is not None:
            self._control.operator().check_target(agency)
        return agency


async def _no_route(request: web.Request) -> web.Response:
    """404, or 405 with the methods a known path takes."""
    catch_all = request.match_info.route.resource
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not catch_all:
            _, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        headers = {"Allow": ", ".join(sorted(allowed))}
        return web.json_response({"error": "method not allowed"}, status=405, headers=headers)
    return web.json_response({"error": "no such endpoint"}, status=404)


async def _expect(request: web.Request) -> None:
    """``Expect: 100-continue`` answered as aiohttp does; any other expectation is a 417 that
    does not repeat the header (aiohttp's own answer puts it in its text, and fails with a 500
    on bytes that are not UTF-8)."""
    if request.version != HttpVersion11:
        return
    if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
        raise web.HTTPExpectationFailed(text="only Expect: 100-continue is understood")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the body of the answer has not started yet


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"the body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ValueError("the body is not a JSON object")  # noqa: TRY004 - answered 400
    return body


def _refused(error: ValueError | PartnerError) -> web.Response:
    """The answer to a request the relay will not carry out."""
    if isinstance(error, UnknownTargetError):
        body = {"error": str(error), error.what: error.name, "closest": error.closest}
        return web.json_response(body, status=404)
    if isinstance(error, PlanChangedError):
        return web.json_response({"error": str(error)}, status=409)
    if isinstance(error, ValidationError):  # a command the model refuses: say which field
        return web.json_response({"error": _first_problem(error)}, status=400)
    if isinstance(error, PartnerError):  # an audit ChouetteCopro did not answer (redacted)
        return web.json_response({"error": str(error)}, status=502)
    return web.json_response({"error": str(error)}, status=400)


def _first_problem(error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "request"
    return f"{where}: {first['msg']}"


def _requester(request: web.Request) -> str:
    return f"http:{request.remote or 'unknown'}"


def _forbidden(disabled: bool) -> web.Response:
    detail = (
        "admin actions are disabled: set CHOUETTE_RELAY_HTTP__ADMIN_TOKEN_FILE"
        if disabled
        else "missing or wrong bearer token"
    )
    return web.json_response({"error": detail}, status=403 if disabled else 401)
