"""A local ChouetteCopro: the assumed contract, in memory, with rate limits and fault injection.

Every request under ``/api/v1`` goes through the same steps: injected faults, Basic auth, the
key's rate limit (and a record of any request sent before the Retry-After it was given), then
validation against ``schemas/chouettecopro.openapi.yaml`` with openapi-core (multipart bodies
included), and only then the handler. Scripted answers (``script``) replace the answer to the next
requests of a method: a refusal, a malformed answer after the work was done, a connection that
hangs, an error that echoes the credentials. ``/_sandbox/*`` controls faults and shows the state;
the same is available from Python for tests. Run it alone with
``python -m consumer.local.sandbox --port 8081 --accounts-file accounts.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import functools
import json
import logging
import math
import random
import signal
import time
import urllib.parse
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from hashlib import sha256
from http import HTTPStatus
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from openapi_core import Config, OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.templating.paths.exceptions import OperationNotFound, PathNotFound
from openapi_core.validation.request.exceptions import ParameterValidationError
from openapi_core.validation.schemas.exceptions import InvalidSchemaValue
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from consumer.ops.webserver import AppServer

logger = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "chouettecopro.openapi.yaml"
JSON_API = "application/vnd.api+json"
DEMO_API_KEY = "sandbox-demo-key"
_MAX_DETAIL = 300


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Token bucket: ``burst`` requests at once, refilled at ``rate_per_s``."""

    rate_per_s: float
    burst: int


@dataclass(frozen=True, slots=True)
class Account:
    """What one API key may touch, and its own rate limit (the server default when None)."""

    condominia: frozenset[str]
    rate_limit: RateLimit | None = None


@dataclass(frozen=True, slots=True)
class SandboxDocument:
    """A stored document. Hand-made ones have no reference and only a title."""

    id: str
    condominium_id: str
    title: str
    reference: str | None = None
    category: str | None = None
    document_date: str | None = None
    module: str | None = None
    audience: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    created_by_hand: bool = False


class Answer(StrEnum):
    """A scripted answer to one API request; see ``SandboxServer.script``."""

    REFUSE = "refuse"  # not carried out: ``status`` with a JSON:API error
    BAD_JSON = "bad_json"  # carried out: its status, and a body that is not JSON
    HTML_502 = "html_502"  # carried out: a proxy's HTML 502 page instead of the answer
    ERROR_200 = "error_200"  # not carried out: 200 with a JSON:API error body
    HANG = "hang"  # carried out: no answer comes until the sandbox closes
    ECHO_CREDENTIALS = "echo_credentials"  # not carried out: ``status``, echoing the key


@dataclass(frozen=True, slots=True)
class Scripted:
    """One scripted answer and, for refusals, its status."""

    answer: Answer
    status: int = 422

    @property
    def carried_out(self) -> bool:
        return self.answer in (Answer.BAD_JSON, Answer.HTML_502, Answer.HANG)


class Faults(BaseModel):
    """Injected faults; ``POST /_sandbox/faults`` takes the same fields (durations from now)."""

    model_config = ConfigDict(extra="forbid")

    error_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    latency_ms: float | None = Field(default=None, ge=0.0)
    outage_seconds: float | None = Field(default=None, ge=0.0)
    storm_seconds: float | None = Field(default=None, ge=0.0)
    storm_retry_after_s: int | None = Field(default=None, ge=1)


@dataclass(slots=True)
class _FaultState:
    error_rate: float = 0.0
    latency_ms: float = 0.0
    outage_until: float = -math.inf
    storm_until: float = -math.inf
    storm_retry_after_s: int | None = None


@dataclass(slots=True)
class _TokenBucket:
    limit: RateLimit
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one is available."""
        self.tokens = min(
            self.limit.burst, self.tokens + (now - self.updated) * self.limit.rate_per_s
        )
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.limit.rate_per_s


@dataclass(frozen=True, slots=True)
class _Call:
    api_key: str
    account: Account
    path: Mapping[str, Any]
    query: Mapping[str, Any]
    body: Any


_Handler = Callable[[web.Request, _Call], Awaitable[web.Response]]


class _OpenAPIRequest:
    """An aiohttp request as openapi-core reads it (with the boundary the contrib class drops)."""

    def __init__(self, request: web.Request, body: bytes | None) -> None:
        self.parameters = RequestParameters(
            query=request.query, header=request.headers, cookie=request.cookies
        )
        self.method = request.method.lower()
        # No port: matches the contract's "{scheme}://{host}/api/v1" server.
        self.host_url = f"{request.url.scheme}://{request.url.host}"
        self.path = request.path
        self.body = body
        self.content_type = request.headers.get("Content-Type", "")


def _pdf_as_text(value: bytes, **parameters: str) -> str:
    # The contract types the file part as a string (OpenAPI 3.1 style); latin-1 maps every byte
    # to one character, so the handler gets the exact bytes back with .encode("latin-1").
    return value.decode("latin-1")


@functools.cache
def _load_contract(path: Path) -> OpenAPI:
    config = Config(extra_media_type_deserializers={"application/pdf": _pdf_as_text})
    return OpenAPI.from_file_path(str(path), config=config)


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
        self._default_limit = rate_limit
        self._keep_bytes = keep_bytes
        super().__init__(host=host, port=port)
        self._contract = _load_contract(schema_path)
        self._clock = clock
        self._random = random.Random(seed)  # noqa: S311 - fault sampling, not cryptography
        self._max_upload_bytes = max_upload_bytes
        self._faults = _FaultState()
        self._buckets: dict[str, _TokenBucket] = {}
        self._not_before: dict[str, float] = {}
        self._early: Counter[str] = Counter()
        self._requests: Counter[tuple[str, int]] = Counter()
        self._recent: deque[tuple[str, str, int]] = deque(maxlen=200)
        self._documents: dict[str, SandboxDocument] = {}
        self._bytes: dict[str, bytes] = {}
        self._creates: Counter[str] = Counter()
        self._scripted: defaultdict[str, deque[Scripted]] = defaultdict(deque)
        self._next_id = 1

    # -- lifecycle ---------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_upload_bytes)
        api = "/api/v1"
        app.router.add_get(f"{api}/condominia/{{id}}", self._api(self._get_condominium))
        app.router.add_post(
            f"{api}/condominia/{{condominium_id}}/documents", self._api(self._create_document)
        )
        app.router.add_get(f"{api}/documents", self._api(self._list_documents))
        app.router.add_patch(f"{api}/documents/{{id}}", self._api(self._update_document))
        app.router.add_delete(f"{api}/documents/{{id}}", self._api(self._delete_document))
        app.router.add_route("*", f"{api}/{{tail:.*}}", self._api(self._never_reached))
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
        change = faults if faults is not None else Faults(**fields)
        now = self._clock()
        state = self._faults
        if change.error_rate is not None:
            state.error_rate = change.error_rate
        if change.latency_ms is not None:
            state.latency_ms = change.latency_ms
        if change.outage_seconds is not None:
            state.outage_until = now + change.outage_seconds
        if change.storm_seconds is not None:
            state.storm_until = now + change.storm_seconds
        if change.storm_retry_after_s is not None:
            state.storm_retry_after_s = change.storm_retry_after_s

    def clear_faults(self) -> None:
        self._faults = _FaultState()
        self._scripted.clear()

    def script(self, method: str, *answers: Scripted) -> None:
        """The next API requests with ``method`` (``POST`` creates, ``DELETE`` withdraws...)
        get these answers, one each, in order; later ones are answered normally again."""
        self._scripted[method.upper()].extend(answers)

    def scripted_left(self, method: str | None = None) -> int:
        """Scripted answers not given yet."""
        if method is not None:
            return len(self._scripted[method.upper()])
        return sum(len(queue) for queue in self._scripted.values())

    def set_rate_limit(self, limit: RateLimit | None, *, api_key: str | None = None) -> None:
        """Set one key's limit, or the default of keys without their own (``api_key=None``)."""
        if api_key is None:
            self._default_limit = limit
        else:
            self._accounts[api_key] = dataclasses.replace(self._accounts[api_key], rate_limit=limit)
        self._buckets.clear()

    def grant(self, api_key: str, condominium_id: str) -> None:
        """Give an account access to one more condominium (as ChouetteCopro's admin would)."""
        account = self._accounts[api_key]
        self._accounts[api_key] = dataclasses.replace(
            account, condominia=account.condominia | {condominium_id}
        )

    def seed_manual_document(self, condominium_id: str, title: str) -> str:
        """A document created by hand in ChouetteCopro (no reference); returns its id."""
        document = SandboxDocument(
            id=self._new_id(), condominium_id=condominium_id, title=title, created_by_hand=True
        )
        self._documents[document.id] = document
        return document.id

    def replace_file_by_hand(self, remote_id: str, sha256: str) -> None:
        """Someone replaced a relay-made document's file in the app (its reference stays)."""
        self._documents[remote_id] = dataclasses.replace(self._documents[remote_id], sha256=sha256)

    def delete_by_hand(self, remote_id: str) -> None:
        """Someone deleted a document in the app."""
        self._documents.pop(remote_id)

    def seed_copy(self, remote_id: str) -> str:
        """A second document with the same reference (what an upload retried blindly leaves)."""
        copy = dataclasses.replace(self._documents[remote_id], id=self._new_id())
        self._documents[copy.id] = copy
        return copy.id

    # -- inspection --------------------------------------------------------------------------

    def documents(self, condominium_id: str | None = None) -> list[SandboxDocument]:
        """Stored documents in creation order, of one condominium or all."""
        return [
            d
            for d in self._documents.values()
            if condominium_id is None or d.condominium_id == condominium_id
        ]

    def document(self, remote_id: str) -> SandboxDocument | None:
        return self._documents.get(remote_id)

    def content_of(self, remote_id: str) -> bytes | None:
        """The uploaded bytes (only with ``keep_bytes=True``)."""
        return self._bytes.get(remote_id)

    def create_count(self, reference: str) -> int:
        """Successful creations with this reference; more than one is a duplicate."""
        return self._creates[reference]

    def duplicated_references(self) -> dict[str, int]:
        return {ref: n for ref, n in self._creates.items() if n > 1}

    def early_request_count(self, api_key: str | None = None) -> int:
        """Requests sent before the Retry-After given to their key had expired."""
        return self._early[api_key] if api_key is not None else sum(self._early.values())

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
            "documents": {
                cid: [dataclasses.asdict(d) for d in self.documents(cid)]
                for cid in sorted({d.condominium_id for d in self._documents.values()})
            },
            "create_counts": dict(self._creates),
            "duplicated_references": self.duplicated_references(),
            "early_requests": self.early_request_count(),
            "requests": [
                {"method": m, "status": s, "count": n}
                for (m, s), n in sorted(self._requests.items())
            ],
            "recent_requests": [{"method": m, "path": p, "status": s} for m, p, s in self._recent],
            "faults": {
                "error_rate": self._faults.error_rate,
                "latency_ms": self._faults.latency_ms,
                "outage_remaining_s": max(0.0, self._faults.outage_until - now),
                "storm_remaining_s": max(0.0, self._faults.storm_until - now),
            },
        }

    # -- the request pipeline ----------------------------------------------------------------

    def _api(self, handler: _Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def run(request: web.Request) -> web.Response:
            queue = self._scripted.get(request.method)
            scripted = queue.popleft() if queue else None
            if scripted is not None and not scripted.carried_out:
                response = _scripted_refusal(scripted, request)
            else:
                response = await self._pipeline(request, handler)
                if scripted is not None:
                    response = await self._after(scripted, response)
            self._requests[(request.method, response.status)] += 1
            self._recent.append((request.method, request.path_qs, response.status))
            return response

        return run

    async def _after(self, scripted: Scripted, done: web.Response) -> web.Response:
        """The answer to a request that was carried out, spoilt as scripted."""
        if scripted.answer is Answer.HANG:
            await self.closing.wait()  # the client gives up first; closing ends the wait
            return done
        if scripted.answer is Answer.HTML_502:
            page = "<html><body><h1>502 Bad Gateway</h1></body></html>"
            return web.Response(status=502, text=page, content_type="text/html")
        return web.Response(status=done.status, body=b'{"data": {"type": "documents", "id": ')

    async def _pipeline(self, request: web.Request, handler: _Handler) -> web.Response:
        if self._faults.latency_ms:
            # Wakes early when the sandbox closes, so shutdown never waits for injected latency.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), self._faults.latency_ms / 1000)
        now = self._clock()
        api_key, auth_problem = self._authenticate(request)
        if api_key is not None and now < self._not_before.get(api_key, -math.inf):
            self._early[api_key] += 1
            wait = self._not_before[api_key] - now
            return self._retry_later(429, api_key, now, wait, "sent before Retry-After expired")
        if fault := self._injected_fault(api_key, now):
            return fault
        if api_key is None:
            challenge = {"WWW-Authenticate": 'Basic realm="ChouetteCopro"'}
            return _error(401, "unauthorized", auth_problem, headers=challenge)
        if (wait := self._bucket(api_key, now)) > 0:
            return self._retry_later(429, api_key, now, wait, "rate limit exceeded")
        body = await request.read() if request.body_exists else None
        result = self._contract.unmarshal_request(_OpenAPIRequest(request, body))
        if errors := list(result.errors):
            return _contract_violation(errors[0])
        call = _Call(
            api_key=api_key,
            account=self._accounts[api_key],
            path=result.parameters.path,
            query=result.parameters.query,
            body=result.body,
        )
        return await handler(request, call)

    def _authenticate(self, request: web.Request) -> tuple[str | None, str]:
        header = request.headers.get("Authorization")
        if header is None:
            return None, "send the API key as the Basic auth user name"
        scheme, _, encoded = header.partition(" ")
        not_basic = "the Authorization header is not valid Basic auth"
        if scheme.lower() != "basic":
            return None, not_basic
        try:
            decoded = base64.b64decode(encoded, validate=True).decode()
        except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
            return None, not_basic
        login, colon, password = decoded.partition(":")
        if not colon or password:
            return None, "the Basic auth password must be empty"
        if login not in self._accounts:
            return None, "unknown API key"
        return login, ""

    def _injected_fault(self, api_key: str | None, now: float) -> web.Response | None:
        faults = self._faults
        if now < faults.outage_until:
            return self._retry_later(
                503, api_key, now, faults.outage_until - now, "injected outage"
            )
        if now < faults.storm_until:
            wait = faults.storm_retry_after_s or faults.storm_until - now
            return self._retry_later(429, api_key, now, wait, "injected 429 storm")
        if faults.error_rate and self._random.random() < faults.error_rate:
            return _error(503, "unavailable", "injected error")
        return None

    def _bucket(self, api_key: str, now: float) -> float:
        limit = self._accounts[api_key].rate_limit or self._default_limit
        if limit is None:
            return 0.0
        bucket = self._buckets.get(api_key)
        if bucket is None or bucket.limit != limit:
            bucket = self._buckets[api_key] = _TokenBucket(limit, float(limit.burst), now)
        return bucket.take(now)

    def _retry_later(
        self, status: int, api_key: str | None, now: float, wait: float, detail: str
    ) -> web.Response:
        """429 or 503 with Retry-After; a request from the key before then is recorded as early."""
        retry_after = max(1, math.ceil(wait))
        if api_key is not None:
            self._not_before[api_key] = max(self._not_before.get(api_key, now), now + retry_after)
        code = "rate_limited" if status == 429 else "unavailable"
        return _error(status, code, detail, headers={"Retry-After": str(retry_after)})

    # -- handlers (the request is already valid against the contract) -------------------------

    async def _get_condominium(self, request: web.Request, call: _Call) -> web.Response:
        condominium_id = call.path["id"]
        if denied := self._access(call, condominium_id):
            return denied
        attributes = {"name": condominium_id}
        return _json(
            200, {"data": {"type": "condominia", "id": condominium_id, "attributes": attributes}}
        )

    async def _create_document(self, request: web.Request, call: _Call) -> web.Response:
        condominium_id = call.path["condominium_id"]
        if denied := self._access(call, condominium_id):
            return denied
        attributes, file = call.body["data"]["data"]["attributes"], _file_of(call)
        if refused := _check_file(attributes, file):
            return refused
        document = self._store(self._new_id(), condominium_id, attributes, file)
        self._creates[attributes["reference"]] += 1
        location = f"{self.base_url}/documents/{document.id}"
        return _json(201, {"data": _resource(document, self.base_url)}, {"Location": location})

    async def _update_document(self, request: web.Request, call: _Call) -> web.Response:
        found = self._owned(call, call.path["id"])
        if isinstance(found, web.Response):
            return found
        resource, file = call.body["data"]["data"], _file_of(call)
        if resource["id"] != found.id:
            return _error(409, "conflict", "data.id differs from the URL", pointer="/data/id")
        if refused := _check_file(resource["attributes"], file):
            return refused
        document = self._store(found.id, found.condominium_id, resource["attributes"], file)
        return _json(200, {"data": _resource(document, self.base_url)})

    async def _delete_document(self, request: web.Request, call: _Call) -> web.Response:
        found = self._owned(call, call.path["id"])
        if isinstance(found, web.Response):
            return found
        del self._documents[found.id]
        self._bytes.pop(found.id, None)
        return web.Response(status=204)

    async def _list_documents(self, request: web.Request, call: _Call) -> web.Response:
        condominium_id = call.query["filter[condominium]"]
        if denied := self._access(call, condominium_id):
            return denied
        reference = call.query.get("filter[reference]")
        matching = [
            d
            for d in self.documents(condominium_id)
            if reference is None or d.reference == reference
        ]
        number, size = call.query["page[number]"], call.query["page[size]"]
        page = matching[(number - 1) * size : number * size]
        next_url = None
        if number * size < len(matching):
            next_url = str(request.url.update_query({"page[number]": str(number + 1)}))
        return _json(
            200,
            {
                "data": [_resource(d, self.base_url) for d in page],
                "meta": {"total": len(matching)},
                "links": {"next": next_url},
            },
        )

    async def _never_reached(self, request: web.Request, call: _Call) -> web.Response:
        # The contract check answers 404/405 for every path and method it does not define.
        return _error(404, "not_found", request.path)

    def _access(self, call: _Call, condominium_id: str) -> web.Response | None:
        if condominium_id in call.account.condominia:
            return None
        if any(condominium_id in a.condominia for a in self._accounts.values()):
            detail = f"this key's user has no right on condominium {condominium_id}"
            return _error(403, "forbidden", detail)
        return _error(404, "not_found", f"no condominium {condominium_id}")

    def _owned(self, call: _Call, remote_id: str) -> SandboxDocument | web.Response:
        found = self._documents.get(remote_id)
        if found is None:
            return _error(404, "not_found", f"no document {remote_id}")
        return self._access(call, found.condominium_id) or found

    def _store(
        self, remote_id: str, condominium_id: str, attributes: Mapping[str, Any], file: bytes
    ) -> SandboxDocument:
        document = SandboxDocument(
            id=remote_id,
            condominium_id=condominium_id,
            title=attributes["title"],
            reference=attributes["reference"],
            category=attributes["category"],
            document_date=str(attributes["document_date"]),
            module=attributes["module"],
            audience=attributes["audience"],
            sha256=attributes["sha256"],
            size_bytes=attributes["size_bytes"],
        )
        self._documents[remote_id] = document
        if self._keep_bytes:
            self._bytes[remote_id] = file
        return document

    def _new_id(self) -> str:
        remote_id = f"doc-{self._next_id:06d}"
        self._next_id += 1
        return remote_id

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


_NOT_ATTRIBUTES = frozenset({"id", "condominium_id", "created_by_hand"})


def _file_of(call: _Call) -> bytes:
    file: str = call.body["file"]
    return file.encode("latin-1")


def _check_file(attributes: Mapping[str, Any], file: bytes) -> web.Response | None:
    if not file.startswith(b"%PDF"):
        return _error(422, "not_a_pdf", "the file part must be a PDF", parameter="file")
    if len(file) != attributes["size_bytes"]:
        detail = f"the file is {len(file)} bytes, size_bytes says {attributes['size_bytes']}"
        return _error(422, "size_mismatch", detail, pointer="/data/attributes/size_bytes")
    if sha256(file).hexdigest() != attributes["sha256"]:
        detail = "the file's SHA-256 differs from the sha256 attribute"
        return _error(422, "sha256_mismatch", detail, pointer="/data/attributes/sha256")
    return None


def _resource(document: SandboxDocument, base_url: str) -> dict[str, Any]:
    fields = dataclasses.asdict(document)
    attributes = {name: value for name, value in fields.items() if name not in _NOT_ATTRIBUTES}
    return {
        "type": "documents",
        "id": document.id,
        "attributes": attributes,
        "relationships": {
            "condominium": {"data": {"type": "condominia", "id": document.condominium_id}}
        },
        "links": {"self": f"{base_url}/documents/{document.id}"},
    }


def _scripted_refusal(scripted: Scripted, request: web.Request) -> web.Response:
    if scripted.answer is Answer.ERROR_200:
        return _error(200, "unprocessable", "the document could not be stored")
    if scripted.answer is Answer.ECHO_CREDENTIALS:
        return _echo_credentials(scripted.status, request.headers.get("Authorization", ""))
    return _error(scripted.status, "refused", "scripted refusal")


def _echo_credentials(status: int, authorization: str) -> web.Response:
    """A careless partner's error: the credentials it got, in every form it might echo them."""
    _, _, encoded = authorization.partition(" ")
    try:
        key = base64.b64decode(encoded).decode().removesuffix(":")
    except ValueError:
        key = ""
    as_json = orjson.dumps(key).decode()  # then quoted again, so its escapes stay in the text
    errors = [
        {
            "status": str(status),
            "code": "invalid_credentials",
            "title": f"Authorization: {authorization}",
            "detail": f"the key {key} (as JSON {as_json}) was refused",
            "source": {"header": authorization},
        },
        {
            "status": str(status),
            "code": "echo",
            "title": urllib.parse.quote(key, safe=""),
            "detail": f"query api_key={urllib.parse.quote_plus(key)}",
        },
    ]
    # ASCII-only JSON with escaped slashes: the key's bytes appear nowhere raw in the body.
    body = json.dumps({"errors": errors}, ensure_ascii=True).replace("/", "\\/")
    return web.Response(status=status, body=body.encode(), content_type=JSON_API)


def _json(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type=JSON_API, headers=headers
    )


def _error(
    status: int,
    code: str,
    detail: str,
    *,
    pointer: str | None = None,
    parameter: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return _json(
        status, {"errors": [_error_object(status, code, detail, pointer, parameter)]}, headers
    )


def _error_object(
    status: int, code: str, detail: str, pointer: str | None, parameter: str | None
) -> dict[str, Any]:
    error: dict[str, Any] = {
        "status": str(status),
        "code": code,
        "title": HTTPStatus(status).phrase,
        "detail": detail[:_MAX_DETAIL],
    }
    if pointer is not None:
        error["source"] = {"pointer": pointer}
    elif parameter is not None:
        error["source"] = {"parameter": parameter}
    return error


def _contract_violation(error: Exception) -> web.Response:
    """The JSON:API answer to a request that the OpenAPI contract refuses."""
    if isinstance(error, PathNotFound):
        return _error(404, "not_found", "no such endpoint in the contract")
    if isinstance(error, OperationNotFound):
        return _error(405, "method_not_allowed", str(error))
    parameter = error.name if isinstance(error, ParameterValidationError) else None
    cause = error.__cause__
    if not isinstance(cause, InvalidSchemaValue):
        return _error(422, "invalid_request", str(error), parameter=parameter)
    errors = []
    for schema_error in cause.schema_errors:
        # jsonschema's ValidationError (untyped): message and the path of the bad value
        detail = str(getattr(schema_error, "message", schema_error))
        path = getattr(schema_error, "absolute_path", ())
        pointer = "".join(f"/{part}" for part in path) if parameter is None else None
        errors.append(_error_object(422, "invalid_request", detail, pointer, parameter))
    return _json(422, {"errors": errors})


# -- command line ----------------------------------------------------------------------------


class _AccountEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    condominia: list[str]
    rate_per_s: float | None = Field(default=None, gt=0)
    burst: int = Field(default=1, ge=1)


_ACCOUNTS_FILE = TypeAdapter(dict[str, list[str] | _AccountEntry])


def load_accounts(path: Path) -> dict[str, Account]:
    """``{"key": ["c-1"]}`` or ``{"key": {"condominia": [...], "rate_per_s": 2, "burst": 5}}``."""
    accounts: dict[str, Account] = {}
    for key, entry in _ACCOUNTS_FILE.validate_json(path.read_bytes()).items():
        if isinstance(entry, list):
            accounts[key] = Account(frozenset(entry))
        else:
            limit = RateLimit(entry.rate_per_s, entry.burst) if entry.rate_per_s else None
            accounts[key] = Account(frozenset(entry.condominia), limit)
    return accounts


async def _serve(args: argparse.Namespace) -> None:
    limit = RateLimit(args.rate, args.burst) if args.rate else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if args.accounts_file is None:
        accounts = {DEMO_API_KEY: Account(frozenset({"c-1", "c-2"}))}
        logger.info(
            "no --accounts-file: one account, key %s, on condominia c-1 and c-2", DEMO_API_KEY
        )
    else:
        accounts = load_accounts(args.accounts_file)
    sandbox = SandboxServer(
        accounts=accounts,
        rate_limit=limit,
        keep_bytes=args.keep_bytes,
        host=args.host,
        port=args.port,
    )
    async with sandbox:
        logger.info("ChouetteCopro sandbox listening at %s", sandbox.base_url)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m consumer.local.sandbox", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--accounts-file", type=Path, help="JSON: API key -> condominia")
    parser.add_argument("--rate", type=float, default=None, help="default requests/s per key")
    parser.add_argument("--burst", type=int, default=10, help="default burst per key")
    parser.add_argument("--keep-bytes", action="store_true", help="keep uploaded files in memory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
