"""The ChouetteCopro HTTP client: the only module that knows the partner's contract.

It speaks the contract written down in ``schemas/chouettecopro.openapi.yaml`` (JSON:API, Basic
auth with the agency's API key as user name, multipart document upload) and turns every answer
into a result or an error of the relay's tree: retriable (429, 5xx, network), parked (401, 403,
missing key) or rejected (400, 409, 422). It never retries: the scheduler does.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import aiohttp
import orjson
from yarl import URL

from consumer.core.events import Document
from consumer.errors import (
    PartnerError,
    PartnerParkedError,
    PartnerRejectedError,
    PartnerRetriableError,
)
from consumer.partner.keys import ApiKeyStore

logger = logging.getLogger(__name__)

JSON_API = "application/vnd.api+json"
_MAX_DETAIL = 500

Observe = Callable[[str, str, float], None]
"""``observe(operation, status, seconds)``; status is the HTTP code, ``timeout`` or ``network``."""


@dataclass(frozen=True, slots=True)
class RemoteDocument:
    """A document as ChouetteCopro knows it."""

    remote_id: str
    reference: str | None
    sha256: str | None


class ChouetteCoproClient:
    """``async with ChouetteCoproClient(base_url=..., api_keys=...) as client``."""

    def __init__(
        self,
        *,
        base_url: str,
        api_keys: ApiKeyStore,
        timeout_s: float = 30.0,
        user_agent: str = "chouette-relay",
        observe: Observe | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._base = URL(base_url.rstrip("/"))
        # None keeps aiohttp's default: certificates verified against the system CAs.
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._keys = api_keys
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._headers = {"Accept": JSON_API, "User-Agent": user_agent}
        self._observe = observe
        self._session: aiohttp.ClientSession | None = None
        # Per agency (one API key each): no request before this monotonic time (Retry-After).
        self._not_before: dict[str, float] = {}

    async def __aenter__(self) -> Self:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(ssl=self._ssl),
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def __repr__(self) -> str:
        return f"ChouetteCoproClient(base_url={str(self._base)!r})"

    def redact(self, text: str) -> str:
        """``text`` without any form of any agency's API key (see ``ApiKeyStore.redact``)."""
        return self._keys.redact(text)

    async def upload(
        self, *, agency_id: str, condominium_id: str, document: Document, content: bytes
    ) -> RemoteDocument:
        """Create the document in the condominium (201)."""
        url = self._base / "condominia" / condominium_id / "documents"
        form = _document_form({"type": "documents", "attributes": _attributes(document)}, content)
        status, body = await self._call("upload", "POST", url, agency_id, data=form)
        self._expect(status, body, ok=(201,), operation="upload", not_found=PartnerParkedError)
        return _remote_document(body, operation="upload")

    async def update(
        self, *, agency_id: str, remote_id: str, document: Document, content: bytes
    ) -> RemoteDocument:
        """Replace the file and attributes of a published document (200).

        A document deleted by hand meanwhile gives ``PartnerRejectedError`` with ``status`` 404.
        """
        url = self._base / "documents" / remote_id
        resource = {"type": "documents", "id": remote_id, "attributes": _attributes(document)}
        status, body = await self._call(
            "update", "PATCH", url, agency_id, data=_document_form(resource, content)
        )
        self._expect(status, body, ok=(200,), operation="update", not_found=PartnerRejectedError)
        return _remote_document(body, operation="update")

    async def delete(self, *, agency_id: str, remote_id: str) -> None:
        """Withdraw a document; one that is already gone (404) counts as withdrawn."""
        url = self._base / "documents" / remote_id
        status, body = await self._call("delete", "DELETE", url, agency_id)
        self._expect(
            status, body, ok=(204, 404), operation="delete", not_found=PartnerRejectedError
        )

    async def find_by_reference(
        self, *, agency_id: str, condominium_id: str, reference: str
    ) -> RemoteDocument | None:
        """The document the relay published with this reference (LSC document id), if any."""
        url = (self._base / "documents").with_query(
            {"filter[condominium]": condominium_id, "filter[reference]": reference}
        )
        status, body = await self._call("find_by_reference", "GET", url, agency_id)
        self._expect(
            status, body, ok=(200,), operation="find_by_reference", not_found=PartnerParkedError
        )
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise PartnerRetriableError(
                "find_by_reference: the answer has no data list", status=200
            )
        found = [
            _resource(item, operation="find_by_reference")
            for item in data
            if isinstance(item, dict) and _reference_of(item) == reference
        ]
        if len(found) > 1:
            logger.warning(
                "condominium %s holds %d documents with reference %s; using %s",
                condominium_id,
                len(found),
                reference,
                found[0].remote_id,
            )
        return found[0] if found else None

    async def _call(
        self, operation: str, method: str, url: URL, agency_id: str, *, data: Any = None
    ) -> tuple[int, Any]:
        session = self._session
        if session is None:
            raise RuntimeError("ChouetteCoproClient used outside 'async with'")
        key = self._keys.require(agency_id)
        headers = {"Authorization": _basic_authorization(key.get_secret_value(), agency_id)}
        wait = self._not_before.get(agency_id, 0.0) - time.monotonic()
        if wait > 0:
            # Another request of this key was told to come back later: so is this one, even if
            # it was already being prepared when that answer arrived.
            raise PartnerRetriableError(
                f"{operation}: ChouetteCopro asked this key to wait", status=429, retry_after=wait
            )
        started = time.monotonic()
        outcome = "cancelled"
        try:
            async with session.request(method, url, headers=headers, data=data) as response:
                raw = await response.read()
                outcome = str(response.status)
                retry_after = _retry_after(response.headers.get("Retry-After"))
        except TimeoutError:
            outcome = "timeout"
            raise PartnerRetriableError(f"{operation}: ChouetteCopro timed out") from None
        except aiohttp.ClientError as exc:
            outcome = "network"
            raise PartnerRetriableError(
                f"{operation}: cannot reach ChouetteCopro: {type(exc).__name__}"
            ) from None
        finally:
            if self._observe is not None:
                self._observe(operation, outcome, time.monotonic() - started)
        body = _parse_json(raw)
        if response.status == 429 or response.status >= 500 or response.status == 408:
            if retry_after is not None:
                until = time.monotonic() + retry_after
                self._not_before[agency_id] = max(self._not_before.get(agency_id, 0.0), until)
            raise PartnerRetriableError(
                self._message(operation, response.status, body),
                status=response.status,
                retry_after=retry_after,
            )
        return response.status, body

    def _message(self, operation: str, status: int, body: Any) -> str:
        # A partner may echo the credentials in an error (raw, Basic, JSON- or URL-encoded):
        # redacted before anything is cut, so that no fragment of a key survives the cut.
        return self._keys.redact(_message(operation, status, body))[:_MAX_DETAIL]

    def _expect(
        self,
        status: int,
        body: Any,
        *,
        ok: tuple[int, ...],
        operation: str,
        not_found: type[PartnerError],
    ) -> None:
        if status in ok:
            return
        _refuse(self._message(operation, status, body), status, operation, not_found)


def _refuse(message: str, status: int, operation: str, not_found: type[PartnerError]) -> None:
    if 200 <= status < 300 and operation != "find_by_reference":
        # A write answered with another success than the contract's (say, 200 and an error
        # body): whether it happened is unknown, and the retry looks it up by reference.
        raise PartnerRetriableError(f"{message} (outcome unknown)", status=status)
    if status in (401, 403):
        raise PartnerParkedError(message, status=status)
    if status == 404:
        raise not_found(message, status=status)
    if status in (400, 409, 413, 422):
        raise PartnerRejectedError(message, status=status)
    # Anything else (405, 415, an unexpected 2xx...) means the contract changed: an operator
    # must look before more documents are sent.
    raise PartnerParkedError(f"{message} (not in the contract)", status=status)


def _basic_authorization(key: str, agency_id: str) -> str:
    """Basic auth with the key as user name and an empty password (RFC 7617)."""
    if ":" in key:
        raise PartnerParkedError(f"the API key of agency {agency_id} contains ':'")
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode("ascii")


def _attributes(document: Document) -> dict[str, Any]:
    return {
        "reference": document.id,
        "title": document.title,
        "category": document.category,
        "document_date": document.document_date.isoformat(),
        "module": document.module.value,
        "audience": document.audience.value,
        "sha256": document.content.sha256,
        "size_bytes": document.content.size_bytes,
    }


def _document_form(resource: Mapping[str, Any], content: bytes) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("data", orjson.dumps({"data": resource}).decode(), content_type=JSON_API)
    form.add_field("file", content, filename="document.pdf", content_type="application/pdf")
    return form


def _remote_document(body: Any, *, operation: str) -> RemoteDocument:
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        # The partner acted but the answer is unreadable: the outcome is unknown, and the
        # scheduler's retry reconciles it by reference before sending again.
        raise PartnerRetriableError(f"{operation}: the answer has no resource object")
    return _resource(data, operation=operation)


def _resource(data: Mapping[str, Any], *, operation: str) -> RemoteDocument:
    remote_id = data.get("id")
    if not isinstance(remote_id, str) or not remote_id:
        raise PartnerRetriableError(f"{operation}: the resource object has no id")
    attributes = data.get("attributes")
    sha256 = attributes.get("sha256") if isinstance(attributes, dict) else None
    return RemoteDocument(
        remote_id=remote_id,
        reference=_reference_of(data),
        sha256=sha256 if isinstance(sha256, str) else None,
    )


def _reference_of(data: Mapping[str, Any]) -> str | None:
    attributes = data.get("attributes")
    reference = attributes.get("reference") if isinstance(attributes, dict) else None
    return reference if isinstance(reference, str) else None


def _parse_json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _message(operation: str, status: int, body: Any) -> str:
    """``upload: ChouetteCopro answered 422: sha256_mismatch: ... (source)``, not yet redacted."""
    parts = [f"{operation}: ChouetteCopro answered {status}"]
    errors = body.get("errors") if isinstance(body, dict) else None
    if isinstance(errors, list):
        for error in errors[:3]:
            if not isinstance(error, dict):
                continue
            text = ": ".join(
                str(error[field]) for field in ("code", "title", "detail") if error.get(field)
            )
            source = error.get("source")
            if isinstance(source, dict) and source:
                text += " (" + ", ".join(f"{k}={v}" for k, v in source.items()) + ")"
            parts.append(text[: _MAX_DETAIL * 4])
    return ": ".join(parts)


def _retry_after(value: str | None) -> float | None:
    """Seconds from ``Retry-After``: delay-seconds or an HTTP-date; None when absent or garbage."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


async def list_documents(
    client: ChouetteCoproClient,
    *,
    agency_id: str,
    condominium_id: str,
    page_size: int = 100,
    pace: Callable[[], Awaitable[None]] | None = None,
) -> list[RemoteDocument]:
    """Every document of a condominium, hand-made ones included (reference None), page by page.

    A function beside the class rather than a method, so that it stays one self-contained
    addition to this module; it speaks the same ``listDocuments`` operation as
    ``find_by_reference``.
    """
    found: list[RemoteDocument] = []
    number = 1
    while True:
        if pace is not None:  # the caller's limiter: one token per page requested
            await pace()
        url = (client._base / "documents").with_query(
            {
                "filter[condominium]": condominium_id,
                "page[number]": str(number),
                "page[size]": str(page_size),
            }
        )
        status, body = await client._call("list", "GET", url, agency_id)
        client._expect(status, body, ok=(200,), operation="list", not_found=PartnerParkedError)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise PartnerRetriableError("list: the answer has no data list", status=200)
        found += [_resource(item, operation="list") for item in data if isinstance(item, dict)]
        links = body.get("links") if isinstance(body, dict) else None
        if not data or not isinstance(links, dict) or not links.get("next"):
            return found
        number += 1
