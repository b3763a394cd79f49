"""Fetches the bytes of an LSC document and proves they are the ones the event declared.

Inline content is strict base64; URL content is fetched only from allowlisted hosts, as identity
(a Content-Encoding the relay did not ask for is refused: no decompression bombs), streamed no
further than the declared size, within the fetch timeout, and never followed off the allowlist by
a redirect. The sha256 and size must match the event. A wrong document or a URL the HTTP stack
cannot parse is a ``ContentError`` (dead-letter), an unreachable store a
``ContentUnavailableError`` (the document retries on its own, then is parked).

Content is a stage of its own, before any partner slot (``ContentStage``): the bytes are fetched
and held per agency, at most so many documents at once, so that one agency's slow or trickling
store holds back only that agency's documents.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from types import TracebackType
from typing import Self

import aiohttp
from msgspec import UNSET
from yarl import URL

from consumer.core.events import Content
from consumer.core.planning.plan import Lane
from consumer.errors import ContentError, ContentUnavailableError

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 3


class HostAllowlist:
    """Exact host names, each optionally with a port (``docs.lsc.example`` or ``127.0.0.1:8082``).

    An entry without a port allows that host on any port; an entry with one allows only that port.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        self._any_port: set[str] = set()
        self._with_port: set[tuple[str, int]] = set()
        for raw in entries:
            entry = raw.strip().lower()
            host, sep, port = entry.rpartition(":")
            if sep and port.isdigit() and not host.endswith(":"):  # "[::1]:80" but not "::1"
                self._with_port.add((host.strip("[]"), int(port)))
            elif entry:
                self._any_port.add(entry.strip("[]"))

    def allows(self, url: URL) -> bool:
        host = (url.host or "").lower()
        if url.scheme not in ("http", "https") or not host:
            return False
        port = url.port if url.port is not None else (443 if url.scheme == "https" else 80)
        return host in self._any_port or (host, port) in self._with_port


class ContentStage:
    """The documents whose bytes are in hand, per agency: fetched before a partner slot is taken.

    ``async with stage.hold(agency_id, content, lane=...) as data`` fetches the document and
    holds its bytes for the block, which is the partner job that sends them. At most
    ``per_agency`` documents of one agency are held at once, whether downloading, waiting for a
    partner slot or being sent: the bytes in memory are at most that many documents per agency
    sending, and a slow store fills only its own agency's slots while no partner slot waits for a
    download. Backfill holds all but a quarter of them (as in the executor's window), so a live
    document never queues for its content behind its agency's first publication. A fetch that
    fails leaves its slot at once (the document waits for its retry without one).
    """

    def __init__(self, *, fetch: Callable[[Content], Awaitable[bytes]], per_agency: int) -> None:
        if per_agency < 1:
            raise ValueError(f"per_agency must be >= 1, got {per_agency}")
        self._fetch = fetch
        self._per_agency = per_agency
        self._backfill = max(1, per_agency - per_agency // 4)
        # Per agency of the routing file: every slot, and those backfill may take.
        self._slots: dict[str, tuple[asyncio.Semaphore, asyncio.Semaphore]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, agency_id: str, content: Content, *, lane: Lane) -> AsyncIterator[bytes]:
        slots = self._slots.get(agency_id)
        if slots is None:
            slots = self._slots[agency_id] = (
                asyncio.Semaphore(self._per_agency),
                asyncio.Semaphore(self._backfill),
            )
        every, backfill = slots
        async with contextlib.AsyncExitStack() as held:
            if lane is Lane.BACKFILL:
                await held.enter_async_context(backfill)
            await held.enter_async_context(every)
            yield await self._fetch(content)


class ContentFetcher:
    """``async with ContentFetcher(allowed_hosts=[...], max_bytes=...) as fetcher``.

    Pass ``session`` to share an ``aiohttp.ClientSession`` (then closing it is the caller's job,
    and its connector decides TLS); ``ssl_context`` (a CA bundle) applies to the session made here.
    ``hold`` is ``fetch`` through the fetcher's ``ContentStage`` (``in_hand_per_agency``).
    """

    def __init__(
        self,
        *,
        allowed_hosts: Iterable[str],
        max_bytes: int,
        timeout_s: float = 60.0,
        chunk_size: int = 65_536,
        user_agent: str = "chouette-relay",
        session: aiohttp.ClientSession | None = None,
        ssl_context: ssl.SSLContext | None = None,
        in_hand_per_agency: int = 8,
    ) -> None:
        self._stage = ContentStage(fetch=self.fetch, per_agency=in_hand_per_agency)
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._allowlist = HostAllowlist(allowed_hosts)
        self._max_bytes = max_bytes
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._chunk_size = chunk_size
        self._headers = {"User-Agent": user_agent, "Accept-Encoding": "identity"}
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> Self:
        if self._session is None:
            # Asked for identity; whatever else comes is refused, never inflated.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl), auto_decompress=False
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
        if session is not None and self._owns_session:
            await session.close()

    def hold(
        self, agency_id: str, content: Content, *, lane: Lane
    ) -> contextlib.AbstractAsyncContextManager[bytes]:
        """The document's bytes, held in one of its agency's slots for the block."""
        return self._stage.hold(agency_id, content, lane=lane)

    async def fetch(self, content: Content) -> bytes:
        """The document's bytes, checked against ``content.sha256`` and ``content.size_bytes``."""
        if content.size_bytes > self._max_bytes:
            raise ContentError(
                f"declared size {content.size_bytes} exceeds the limit of {self._max_bytes} bytes",
                reason="too_large",
            )
        if content.inline_base64 is not UNSET:
            data = self._decode_inline(content.inline_base64)
        elif content.url is not UNSET:
            data = await self._download(_parse_url(content.url), content.size_bytes)
        else:  # the model guarantees one source; keep mypy and future models honest
            raise ContentError("content has neither url nor inline_base64", reason="not_found")
        if len(data) != content.size_bytes:
            raise ContentError(
                f"content is {len(data)} bytes, the event declared {content.size_bytes}",
                reason="size_mismatch",
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != content.sha256:
            raise ContentError(
                f"content sha256 is {digest}, the event declared {content.sha256}",
                reason="sha256_mismatch",
            )
        return data

    def _decode_inline(self, text: str) -> bytes:
        if len(text) // 4 * 3 > self._max_bytes + 3:
            raise ContentError("inline content exceeds the size limit", reason="too_large")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ContentError(
                f"inline content is not valid base64: {exc}", reason="bad_base64"
            ) from None

    async def _download(self, url: URL, declared_size: int) -> bytes:
        session = self._session
        if session is None:
            raise RuntimeError("ContentFetcher used outside 'async with'")
        for _ in range(_MAX_REDIRECTS + 1):
            if not self._allowlist.allows(url):
                raise ContentError(
                    f"host {url.host}:{url.port} is not on the content allowlist",
                    reason="host_not_allowed",
                )
            try:
                async with session.get(
                    url, headers=self._headers, timeout=self._timeout, allow_redirects=False
                ) as response:
                    location = response.headers.get("Location")
                    if response.status in _REDIRECTS and location:
                        url = url.join(_parse_url(location))
                        continue
                    self._check_status(url, response.status)
                    _check_encoding(url, response.headers.get("Content-Encoding"))
                    return await self._read_limited(url, response, declared_size)
            except aiohttp.InvalidURL as exc:
                raise ContentError(
                    f"cannot fetch a URL the HTTP stack refuses: {exc}", reason="bad_url"
                ) from None
            except TimeoutError:
                raise ContentUnavailableError(
                    f"timed out fetching {url.with_query(None)}", reason="timeout"
                ) from None
            except aiohttp.ClientError as exc:
                raise ContentUnavailableError(
                    f"cannot fetch {url.with_query(None)}: {type(exc).__name__}: {exc}",
                    reason="unavailable",
                ) from None
        raise ContentError(f"more than {_MAX_REDIRECTS} redirects from {url}", reason="not_found")

    @staticmethod
    def _check_status(url: URL, status: int) -> None:
        if status == 200:
            return
        where = url.with_query(None)
        if status >= 500 or status in (408, 429):
            raise ContentUnavailableError(
                f"document store answered {status} for {where}", reason="unavailable"
            )
        # 404/410 and every other refusal: the document cannot be had by asking again.
        raise ContentError(f"document store answered {status} for {where}", reason="not_found")

    async def _read_limited(
        self, url: URL, response: aiohttp.ClientResponse, declared_size: int
    ) -> bytes:
        length = response.content_length
        if length is not None and length > self._max_bytes:
            raise ContentError(
                f"{url.with_query(None)} is {length} bytes, over the limit of {self._max_bytes}",
                reason="too_large",
            )
        if length is not None and length != declared_size:
            raise ContentError(
                f"{url.with_query(None)} is {length} bytes, the event declared {declared_size}",
                reason="size_mismatch",
            )
        # Never more than the declared size plus one byte: one more is enough to refuse it.
        limit = min(declared_size, self._max_bytes) + 1
        body = bytearray()
        while len(body) < limit:
            chunk = await response.content.read(min(self._chunk_size, limit - len(body)))
            if not chunk:
                break
            body += chunk
        if len(body) > self._max_bytes:
            raise ContentError(
                f"{url.with_query(None)} exceeds the limit of {self._max_bytes} bytes",
                reason="too_large",
            )
        if len(body) > declared_size:
            raise ContentError(
                f"{url.with_query(None)} is longer than the declared {declared_size} bytes",
                reason="size_mismatch",
            )
        return bytes(body)


def _parse_url(text: str) -> URL:
    """The URL, or ``ContentError("bad_url")`` for one yarl cannot parse (a port above 65535)."""
    try:
        url = URL(text)
        _ = url.host, url.port  # decoded lazily: a bad IDNA host or port raises only here
    except (ValueError, TypeError) as exc:  # UnicodeError (IDNA) is a ValueError
        raise ContentError(f"the document URL cannot be parsed: {exc}", reason="bad_url") from None
    return url


def _check_encoding(url: URL, encoding: str | None) -> None:
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        raise ContentError(
            f"{url.with_query(None)} came with Content-Encoding {encoding[:40]!r}, not identity",
            reason="content_encoding",
        )
