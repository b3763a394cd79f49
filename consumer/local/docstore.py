"""A tiny LSC document store: serves PDFs at ``/documents/{name}.pdf`` on loopback.

Events point at it with content URLs, so the content fetcher can be exercised against a real HTTP
server. Faults are set per document (an error status, a slow body, no Content-Length, a body that
never ends, a Content-Encoding nobody asked for, more bytes than the event declares) and requests
are counted per document.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from aiohttp import web

from consumer.local.pdf import make_pdf
from consumer.ops.webserver import AppServer

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
_ENDLESS_CHUNK = b"%PDF-1.4\n" + b"0" * 65_527


class StoredPdf(NamedTuple):
    """Where a document is served and what it holds."""

    url: str
    sha256: str
    size: int


@dataclass(slots=True)
class _Fault:
    status: int | None = None
    chunk_delay_s: float = 0.0
    hide_length: bool = False
    encoding: str | None = None
    extra_bytes: int = 0


class DocumentStore(AppServer):
    """In-memory PDF server; ``async with DocumentStore() as store: store.add_pdf(...)``."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, chunk_size: int = 16_384) -> None:
        super().__init__(host=host, port=port)
        self._chunk_size = chunk_size
        self._files: dict[str, bytes] = {}
        self._endless: set[str] = set()
        self._faults: dict[str, _Fault] = {}
        self._requests: Counter[str] = Counter()

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/documents/{name}.pdf", self._serve)
        return app

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def url_of(self, name: str) -> str:
        return f"{self.base_url}/documents/{name}.pdf"

    def save(self, directory: Path) -> None:
        """Write every served file to ``directory`` (``make run KEEP=1`` serves them again)."""
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in self._files.items():
            (directory / f"{name}.pdf").write_bytes(data)

    def load(self, directory: Path) -> None:
        """Serve again what ``save`` wrote."""
        for path in directory.glob("*.pdf"):
            self.add_bytes(path.name.removesuffix(".pdf"), path.read_bytes())

    def add_pdf(self, name: str, title: str) -> StoredPdf:
        """Generate a real PDF showing ``title`` and serve it under ``name``."""
        return self.add_bytes(name, make_pdf(title, lines=[f"LSC document {name}"]))

    def add_bytes(self, name: str, data: bytes) -> StoredPdf:
        """Serve arbitrary bytes (not necessarily a PDF) under ``name``."""
        self._check_name(name)
        self._files[name] = data
        self._endless.discard(name)
        return StoredPdf(self.url_of(name), hashlib.sha256(data).hexdigest(), len(data))

    def add_endless(self, name: str) -> str:
        """Serve a body that never ends (no Content-Length): only a size limit stops a reader."""
        self._check_name(name)
        self._endless.add(name)
        self._files.pop(name, None)
        return self.url_of(name)

    def remove(self, name: str) -> None:
        self._files.pop(name, None)
        self._endless.discard(name)

    def set_status(self, name: str, status: int | None) -> None:
        """Answer ``status`` (with no document) for ``name``; None serves it normally again."""
        self._faults.setdefault(name, _Fault()).status = status

    def set_slow(self, name: str, chunk_delay_s: float) -> None:
        """Wait ``chunk_delay_s`` before each chunk of the body (headers go out at once)."""
        self._faults.setdefault(name, _Fault()).chunk_delay_s = chunk_delay_s

    def hide_length(self, name: str, hidden: bool = True) -> None:
        """Send the body chunked, without Content-Length."""
        self._faults.setdefault(name, _Fault()).hide_length = hidden

    def set_encoding(self, name: str, encoding: str | None) -> None:
        """Serve ``name`` compressed (``gzip`` or ``deflate``) with that Content-Encoding,
        whatever the client asked for; None serves it as identity again."""
        if encoding not in (None, "gzip", "deflate"):
            raise ValueError(f"encoding {encoding!r}: use gzip, deflate or None")
        self._faults.setdefault(name, _Fault()).encoding = encoding

    def set_extra_bytes(self, name: str, extra: int) -> None:
        """Serve ``extra`` bytes more than the stored document (Content-Length included)."""
        self._faults.setdefault(name, _Fault()).extra_bytes = extra

    def clear_faults(self) -> None:
        self._faults.clear()

    def request_count(self, name: str | None = None) -> int:
        """Requests received for ``name``, or for all documents when None."""
        if name is None:
            return sum(self._requests.values())
        return self._requests[name]

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self._requests[name] += 1
        fault = self._faults.get(name, _Fault())
        if fault.status is not None:
            return web.Response(status=fault.status, text=f"fault injected for {name}\n")
        if name in self._endless:
            return await self._stream_forever(request)
        data = self._files.get(name)
        if data is None:
            raise web.HTTPNotFound(text=f"no document {name}\n")
        data += b"0" * fault.extra_bytes
        response = web.StreamResponse(headers={"Content-Type": "application/pdf"})
        if fault.encoding is not None:
            data = gzip.compress(data) if fault.encoding == "gzip" else zlib.compress(data)
            response.headers["Content-Encoding"] = fault.encoding
        if fault.hide_length:
            response.enable_chunked_encoding()
        else:
            response.content_length = len(data)
        await response.prepare(request)
        try:
            for start in range(0, len(data), self._chunk_size):
                if fault.chunk_delay_s:
                    with contextlib.suppress(TimeoutError):  # a closing store stops waiting
                        await asyncio.wait_for(self.closing.wait(), fault.chunk_delay_s)
                await response.write(data[start : start + self._chunk_size])
            await response.write_eof()
        except ConnectionError:
            pass  # the reader gave up (size limit, timeout): nothing left to do
        return response

    async def _stream_forever(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/pdf"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            while True:
                await response.write(_ENDLESS_CHUNK)
        except ConnectionError:
            return response  # the reader gave up, as it should

    @staticmethod
    def _check_name(name: str) -> None:
        if not _NAME_PATTERN.match(name):
            raise ValueError(f"document name {name!r} must match {_NAME_PATTERN.pattern}")
