"""``SandboxServer``: the sandbox's HTTP server, its request pipeline and its control surface.

Every request under ``/api/v1`` goes through the same steps: a scripted refusal, injected latency,
Basic auth, the Retry-After the key was given, injected faults, the key's rate limit, the contract
check, and only then the handler; each answer is counted. ``/_sandbox/*`` and the public methods
control faults and show the state, so tests and ``make run`` drive the same sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from consumer.local.sandbox.accounts import Account, RateLimit, authenticate
from consumer.local.sandbox.contract import (
    SCHEMA_PATH,
    Call,
    Handler,
    OpenAPIRequest,
    contract_violation,
    load_contract,
)
from consumer.local.sandbox.faults import FaultInjector, Faults, InjectedFault
from consumer.local.sandbox.handlers import ContractHandlers
from consumer.local.sandbox.jsonapi import error
from consumer.local.sandbox.ratelimit import KeyLimits
from consumer.local.sandbox.scripted import Script, Scripted, late, refusal, spoil
from consumer.local.sandbox.storage import SandboxDocument, Storage
from consumer.ops.webserver import AppServer


class SandboxServer(AppServer):
    """``async with SandboxServer(accounts={"key": {"c-1"}}) as sandbox: sandbox.base_url``."""

    def __init__(
        self,
        *,
        accounts: Mapping[str, Account | Iterable[str]],
        rate_limit: RateLimit | None = None,
        keep_bytes: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        schema_path: Path = SCHEMA_PATH,
        clock: Callable[[], float] = time.monotonic,
        seed: int = 0,
        max_upload_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._accounts = {
            key: value if isinstance(value, Account) else Account(frozenset(value))
            for key, value in accounts.items()
        }
        self._limits = KeyLimits(rate_limit)
        self._storage = Storage(keep_bytes=keep_bytes)
        super().__init__(host=host, port=port)
        self._contract = load_contract(schema_path)
        self._clock = clock
        self._max_upload_bytes = max_upload_bytes
        self._faults = FaultInjector(clock=clock, seed=seed)
        self._script = Script()
        self._requests: Counter[tuple[str, int]] = Counter()
        self._in_flight = 0  # API requests received and not answered yet
        self._recent: deque[tuple[str, str, int]] = deque(maxlen=200)
        self._handlers = ContractHandlers(
            storage=self._storage, accounts=self._accounts, base_url=lambda: self.base_url
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_upload_bytes)
        api, handlers = "/api/v1", self._handlers
        app.router.add_get(f"{api}/condominia/{{id}}", self._api(handlers.get_condominium))
        app.router.add_post(
            f"{api}/condominia/{{condominium_id}}/documents", self._api(handlers.create_document)
        )
        app.router.add_get(f"{api}/documents", self._api(handlers.list_documents))
        app.router.add_patch(f"{api}/documents/{{id}}", self._api(handlers.update_document))
        app.router.add_delete(f"{api}/documents/{{id}}", self._api(handlers.delete_document))
        app.router.add_route("*", f"{api}/{{tail:.*}}", self._api(handlers.never_reached))
        app.router.add_get("/_sandbox/state", self._control_state)
        app.router.add_post("/_sandbox/faults", self._control_set_faults)
        app.router.add_delete("/_sandbox/faults", self._control_clear_faults)
        app.router.add_post("/_sandbox/manual-documents", self._control_seed)
        return app

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}/api/v1"

    # -- control from Python -----------------------------------------------------------------

    def set_faults(self, faults: Faults | None = None, **fields: Any) -> None:
        """Change the given faults only: ``set_faults(outage_seconds=30)``."""
        self._faults.set(faults if faults is not None else Faults(**fields))

    def clear_faults(self) -> None:
        self._faults.clear()
        self._script.clear()

    def script(self, method: str, *answers: Scripted) -> None:
        """The next API requests with ``method`` (``POST`` creates, ``DELETE`` withdraws...)
        get these answers, one each, in order; later ones are answered normally again."""
        self._script.add(method, answers)

    def scripted_left(self, method: str | None = None) -> int:
        """Scripted answers not given yet."""
        return self._script.left(method)

    def set_rate_limit(self, limit: RateLimit | None, *, api_key: str | None = None) -> None:
        """Set one key's limit, or the default of keys without their own (``api_key=None``)."""
        if api_key is None:
            self._limits.default = limit
        else:
            self._accounts[api_key] = dataclasses.replace(self._accounts[api_key], rate_limit=limit)
        self._limits.reset_buckets()

    def grant(self, api_key: str, condominium_id: str) -> None:
        """Give an account access to one more condominium (as ChouetteCopro's admin would)."""
        account = self._accounts[api_key]
        self._accounts[api_key] = dataclasses.replace(
            account, condominia=account.condominia | {condominium_id}
        )

    def seed_manual_document(self, condominium_id: str, title: str) -> str:
        """A document created by hand in ChouetteCopro (no reference); returns its id."""
        return self._storage.seed_manual_document(condominium_id, title)

    def replace_file_by_hand(self, remote_id: str, sha256: str) -> None:
        """Someone replaced a relay-made document's file in the app (its reference stays)."""
        self._storage.replace_file_by_hand(remote_id, sha256)

    def delete_by_hand(self, remote_id: str) -> None:
        """Someone deleted a document in the app."""
        self._storage.delete_by_hand(remote_id)

    def seed_copy(self, remote_id: str) -> str:
        """A second document with the same reference (what an upload retried blindly leaves)."""
        return self._storage.seed_copy(remote_id)

    # -- inspection --------------------------------------------------------------------------

    def export(self) -> dict[str, Any]:
        """The stored documents, to be restored by a later sandbox (``make run KEEP=1``)."""
        return self._storage.export()

    def restore(self, data: Mapping[str, Any]) -> None:
        self._storage.restore(data)

    def documents(self, condominium_id: str | None = None) -> list[SandboxDocument]:
        """Stored documents in creation order, of one condominium or all."""
        return self._storage.documents(condominium_id)

    def document(self, remote_id: str) -> SandboxDocument | None:
        return self._storage.document(remote_id)

    def content_of(self, remote_id: str) -> bytes | None:
        """The uploaded bytes (only with ``keep_bytes=True``)."""
        return self._storage.content_of(remote_id)

    def create_count(self, reference: str) -> int:
        """Successful creations with this reference; more than one is a duplicate."""
        return self._storage.create_count(reference)

    @property
    def in_flight(self) -> int:
        """API requests received and not answered yet (a late or hung one among them)."""
        return self._in_flight

    def duplicated_references(self) -> dict[str, int]:
        return self._storage.duplicated_references()

    def early_request_count(self, api_key: str | None = None) -> int:
        """Requests sent before the Retry-After given to their key had expired."""
        return self._limits.early_count(api_key)

    def request_count(self, method: str | None = None, status: int | None = None) -> int:
        """API requests answered, filtered by method and/or status."""
        return sum(
            n
            for (m, s), n in self._requests.items()
            if (method is None or m == method) and (status is None or s == status)
        )

    def state(self) -> dict[str, Any]:
        """Everything ``GET /_sandbox/state`` shows (no API keys)."""
        now = self._clock()
        return {
            "documents": self._storage.by_condominium(),
            "create_counts": self._storage.create_counts(),
            "duplicated_references": self.duplicated_references(),
            "early_requests": self.early_request_count(),
            "in_flight": self._in_flight,
            "requests": [
                {"method": m, "status": s, "count": n}
                for (m, s), n in sorted(self._requests.items())
            ],
            "recent_requests": [{"method": m, "path": p, "status": s} for m, p, s in self._recent],
            "faults": self._faults.describe(now),
        }

    # -- the request pipeline ----------------------------------------------------------------

    def _api(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def run(request: web.Request) -> web.Response:
            scripted = self._script.next(request.method)
            self._in_flight += 1
            try:
                if scripted is not None and not scripted.carried_out:
                    response = refusal(scripted, request)
                else:
                    if scripted is not None:
                        await late(scripted, request, self.closing)  # the work itself comes late
                    response = await self._pipeline(request, handler)
                    if scripted is not None:
                        response = await spoil(scripted, response, self.closing)
            finally:
                self._in_flight -= 1
            self._requests[(request.method, response.status)] += 1
            self._recent.append((request.method, request.path_qs, response.status))
            return response

        return run

    async def _pipeline(self, request: web.Request, handler: Handler) -> web.Response:
        if self._faults.latency_ms:
            # Wakes early when the sandbox closes, so shutdown never waits for injected latency.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), self._faults.latency_ms / 1000)
        now = self._clock()
        api_key, auth_problem = authenticate(request, self._accounts)
        if api_key is not None and (wait := self._limits.early_wait(api_key, now)) > 0:
            return self._retry_later(429, api_key, now, wait, "sent before Retry-After expired")
        if (fault := self._faults.injected(now)) is not None:
            return self._fault_answer(fault, api_key, now)
        if api_key is None:
            challenge = {"WWW-Authenticate": 'Basic realm="ChouetteCopro"'}
            return error(401, "unauthorized", auth_problem, headers=challenge)
        own_limit = self._accounts[api_key].rate_limit
        if (wait := self._limits.wait(api_key, own_limit, now)) > 0:
            return self._retry_later(429, api_key, now, wait, "rate limit exceeded")
        body = await request.read() if request.body_exists else None
        result = self._contract.unmarshal_request(OpenAPIRequest(request, body))
        if errors := list(result.errors):
            return contract_violation(errors[0])
        call = Call(
            api_key=api_key,
            account=self._accounts[api_key],
            path=result.parameters.path,
            query=result.parameters.query,
            body=result.body,
        )
        return await handler(request, call)

    def _fault_answer(self, fault: InjectedFault, api_key: str | None, now: float) -> web.Response:
        if fault.wait_s is None:
            return error(fault.status, "unavailable", fault.detail)
        return self._retry_later(fault.status, api_key, now, fault.wait_s, fault.detail)

    def _retry_later(
        self, status: int, api_key: str | None, now: float, wait: float, detail: str
    ) -> web.Response:
        """429 or 503 with Retry-After; a request from the key before then is recorded as early."""
        retry_after = self._limits.retry_after(api_key, now, wait)
        code = "rate_limited" if status == 429 else "unavailable"
        return error(status, code, detail, headers={"Retry-After": str(retry_after)})

    # -- control endpoints -------------------------------------------------------------------

    async def _control_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state(), dumps=lambda v: orjson.dumps(v).decode())

    async def _control_set_faults(self, request: web.Request) -> web.Response:
        try:
            self.set_faults(Faults.model_validate_json(await request.read()))
        except ValidationError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return await self._control_state(request)

    async def _control_clear_faults(self, request: web.Request) -> web.Response:
        self.clear_faults()
        return await self._control_state(request)

    async def _control_seed(self, request: web.Request) -> web.Response:
        try:
            seed = _ManualDocument.model_validate_json(await request.read())
        except ValidationError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(
            {"id": self.seed_manual_document(seed.condominium_id, seed.title)}, status=201
        )


class _ManualDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")
    condominium_id: str
    title: str = Field(min_length=1)
