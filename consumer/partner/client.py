"""The ChouetteCopro HTTP client: with ``answers``, the one place that knows the partner's API.

It speaks the contract written down in ``schemas/chouettecopro.openapi.yaml`` (JSON:API, Basic
auth with the agency's API key as user name, multipart document upload); every answer becomes a
result or an error of the relay's tree (``answers``): retriable (429, 5xx, network), parked
(401, 403, missing key) or rejected (400, 409, 422). It never retries: the scheduler does.

What crosses to the partner is checked here, for every call: an id put into a URL must be of the
contract's form and goes in as one encoded path segment (``RemoteIdError`` otherwise, before any
request), and an answer is read no further than ``max_answer_bytes``.
"""

from __future__ import annotations

import base64
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

from consumer.core.events import Document
from consumer.errors import (
    PartnerError,
    PartnerParkedError,
    PartnerRejectedError,
    PartnerRetriableError,
    RemoteIdError,
)
from consumer.partner.answers import (
    MAX_DETAIL,
    REMOTE_ID_PATTERN,
    RemoteDocument,
    answer_message,
    is_remote_id,
    parse_json,
    read_resource,
    reference_of,
    refuse,
    remote_document,
    retry_after_seconds,
)
from consumer.partner.keys import ApiKeyStore

logger = logging.getLogger(__name__)

JSON_API = "application/vnd.api+json"

DEFAULT_MAX_ANSWER_BYTES = 4 * 1024 * 1024
"""JSON:API answers are a resource, a page of them or a few error objects: kilobytes."""

Observe = Callable[[str, str, float], None]
"""``observe(operation, status, seconds)``; status is the HTTP code, ``timeout``, ``network``, or
``too_large`` (an answer beyond ``max_answer_bytes``)."""


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
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
    ) -> None:
        self._base = URL(base_url.rstrip("/"))
        self._max_answer_bytes = max_answer_bytes
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
        url = self._url(
            "condominia", _segment("upload", "condominium", condominium_id), "documents"
        )
        form = _document_form({"type": "documents", "attributes": _attributes(document)}, content)
        status, body = await self._call("upload", "POST", url, agency_id, data=form)
        self._expect(status, body, ok=(201,), operation="upload", not_found=PartnerParkedError)
        return remote_document(body, operation="upload")

    async def update(
        self, *, agency_id: str, remote_id: str, document: Document, content: bytes
    ) -> RemoteDocument:
        """Replace the file and attributes of a published document (200).

        A document deleted by hand meanwhile gives ``PartnerRejectedError`` with ``status`` 404.
        """
        url = self._url("documents", _segment("update", "document", remote_id))
        resource = {"type": "documents", "id": remote_id, "attributes": _attributes(document)}
        status, body = await self._call(
            "update", "PATCH", url, agency_id, data=_document_form(resource, content)
        )
        self._expect(status, body, ok=(200,), operation="update", not_found=PartnerRejectedError)
        return remote_document(body, operation="update")

    async def delete(self, *, agency_id: str, remote_id: str) -> None:
        """Withdraw a document; one that is already gone (404) counts as withdrawn."""
        url = self._url("documents", _segment("delete", "document", remote_id))
        status, body = await self._call("delete", "DELETE", url, agency_id)
        self._expect(
            status, body, ok=(204, 404), operation="delete", not_found=PartnerRejectedError
        )

    async def find_by_reference(
        self, *, agency_id: str, condominium_id: str, reference: str
    ) -> RemoteDocument | None:
        """The document the relay published with this reference (LSC document id), if any."""
        found = await self.find_all_by_reference(
            agency_id=agency_id, condominium_id=condominium_id, reference=reference
        )
        return found[0] if found else None

    async def find_all_by_reference(
        self, *, agency_id: str, condominium_id: str, reference: str
    ) -> list[RemoteDocument]:
        """Every document of the condominium with this reference: one, or none, or copies
        that a request thought lost left behind."""
        condominium = _checked_id("find_by_reference", "condominium", condominium_id)
        url = self._url("documents").with_query(
            {"filter[condominium]": condominium, "filter[reference]": reference}
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
        return [
            read_resource(item, operation="find_by_reference")
            for item in data
            if isinstance(item, dict) and reference_of(item) == reference
        ]

    def _url(self, *segments: str) -> URL:
        """The API URL of ``segments``, each already one encoded path segment (``_segment``)."""
        return self._base.joinpath(*segments, encoded=True)

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
        # Carried out after no answer came, a create leaves a second copy and an update may land
        # after the document's next one; a lookup or a withdrawal (of that id) changes nothing.
        writes = method in ("POST", "PATCH")
        try:
            async with session.request(method, url, headers=headers, data=data) as response:
                raw = await self._read_answer(response)
                outcome = str(response.status) if raw is not None else "too_large"
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        except aiohttp.ConnectionTimeoutError:
            outcome = "timeout"  # no connection in time: the request never left
            raise PartnerRetriableError(f"{operation}: ChouetteCopro timed out") from None
        except TimeoutError:
            outcome = "timeout"
            raise PartnerRetriableError(
                f"{operation}: ChouetteCopro timed out", in_doubt=writes
            ) from None
        except aiohttp.ClientConnectorError as exc:
            outcome = "network"  # no connection: the request never left
            raise PartnerRetriableError(
                f"{operation}: cannot reach ChouetteCopro: {type(exc).__name__}"
            ) from None
        except aiohttp.ClientError as exc:
            outcome = "network"  # the connection was lost: the request may have been sent
            raise PartnerRetriableError(
                f"{operation}: lost the connection to ChouetteCopro: {type(exc).__name__}",
                in_doubt=writes,
            ) from None
        finally:
            if self._observe is not None:
                self._observe(operation, outcome, time.monotonic() - started)
        body = parse_json(raw or b"")
        if response.status == 429 or response.status >= 500 or response.status == 408:
            if retry_after is not None:
                until = time.monotonic() + retry_after
                self._not_before[agency_id] = max(self._not_before.get(agency_id, 0.0), until)
            raise PartnerRetriableError(
                self._message(operation, response.status, body),
                status=response.status,
                retry_after=retry_after,
                # A gateway that gave up on the backend (502, 504) says nothing of the request.
                in_doubt=writes and response.status in (502, 504),
            )
        if raw is None:
            # Whatever its status says, an answer this large is outside the contract: the
            # partner answered, so the outcome is unknown but not in doubt, and a create's next
            # attempt looks the document up by reference before sending it again.
            raise PartnerRetriableError(
                f"{operation}: ChouetteCopro answered {response.status} with more than "
                f"{self._max_answer_bytes} bytes, left unread (outcome unknown)",
                status=response.status,
            )
        return response.status, body

    async def _read_answer(self, response: aiohttp.ClientResponse) -> bytes | None:
        """The answer's body, or None when it is larger than ``max_answer_bytes``.

        A larger answer is refused by its Content-Length or, without one, once the limit is
        passed while streaming, and its connection is closed rather than read to the end.
        """
        limit = self._max_answer_bytes
        declared = response.content_length
        if declared is None or declared <= limit:
            body = bytearray()
            async for chunk in response.content.iter_any():
                body += chunk
                if len(body) > limit:
                    break
            else:
                return bytes(body)
        response.close()
        return None

    def _message(self, operation: str, status: int, body: Any) -> str:
        # A partner may echo the credentials in an error (raw, Basic, JSON- or URL-encoded):
        # redacted before anything is cut, so that no fragment of a key survives the cut.
        return self._keys.redact(answer_message(operation, status, body))[:MAX_DETAIL]

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
        refuse(self._message(operation, status, body), status, operation, not_found)


def _checked_id(operation: str, kind: str, value: str) -> str:
    """``value``, once it is a ChouetteCopro id of the contract's form.

    The id may come from an answer, the view, a command or the routing file: whichever it is,
    one that could leave the API's paths (a ``/``, a dot segment, a query or fragment, an
    escape) is refused before any request is made with it.
    """
    if not is_remote_id(value):
        raise RemoteIdError(
            f"{operation}: the {kind} id {str(value)[:80]!a} is not a ChouetteCopro id of the "
            f"contract's form {REMOTE_ID_PATTERN}; no request was made with it"
        )
    return value


def _segment(operation: str, kind: str, value: str) -> str:
    """A checked id as one encoded URL path segment; the encoding is a second guard, as the
    pattern allows none of the characters it would escape."""
    return quote(_checked_id(operation, kind, value), safe="")


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


async def list_page(
    client: ChouetteCoproClient,
    *,
    agency_id: str,
    condominium_id: str,
    number: int,
    page_size: int = 100,
) -> tuple[list[RemoteDocument], bool]:
    """One page of a condominium's documents, hand-made ones included (reference None), and
    whether another page follows.

    A function beside the class rather than a method, so that it stays one self-contained
    addition to this module; it speaks the same ``listDocuments`` operation as
    ``find_by_reference``.
    """
    url = client._url("documents").with_query(
        {
            "filter[condominium]": _checked_id("list", "condominium", condominium_id),
            "page[number]": str(number),
            "page[size]": str(page_size),
        }
    )
    status, body = await client._call("list", "GET", url, agency_id)
    client._expect(status, body, ok=(200,), operation="list", not_found=PartnerParkedError)
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise PartnerRetriableError("list: the answer has no data list", status=200)
    found = [read_resource(item, operation="list") for item in data if isinstance(item, dict)]
    links = body.get("links") if isinstance(body, dict) else None
    return found, bool(data) and isinstance(links, dict) and bool(links.get("next"))
