"""ContentFetcher against the local document store: allowlist, integrity, size limit, faults."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import pytest
from yarl import URL

from consumer.core.events import Content
from consumer.errors import ContentError, ContentUnavailableError
from consumer.local.docstore import DocumentStore, StoredPdf
from consumer.local.pdf import make_pdf
from consumer.partner.content import ContentFetcher, HostAllowlist

MAX_BYTES = 256 * 1024


def url_content(
    stored: StoredPdf, *, sha256: str | None = None, size: int | None = None
) -> Content:
    return Content(
        media_type="application/pdf",
        size_bytes=stored.size if size is None else size,
        sha256=stored.sha256 if sha256 is None else sha256,
        url=stored.url,
    )


def inline_content(data: bytes) -> Content:
    return Content(
        media_type="application/pdf",
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        inline_base64=base64.b64encode(data).decode(),
    )


@pytest.fixture
async def fetcher(docstore: DocumentStore) -> AsyncIterator[ContentFetcher]:
    async with ContentFetcher(
        allowed_hosts=[f"127.0.0.1:{docstore.port}"], max_bytes=MAX_BYTES, timeout_s=5
    ) as fetcher:
        yield fetcher


async def reason_of(fetcher: ContentFetcher, content: Content) -> str:
    with pytest.raises(ContentError) as caught:
        await fetcher.fetch(content)
    assert not isinstance(caught.value, ContentUnavailableError)
    assert not caught.value.retriable
    return caught.value.reason


async def test_a_document_from_an_allowed_host_is_fetched_and_checked(
    fetcher: ContentFetcher, docstore: DocumentStore
) -> None:
    stored = docstore.add_pdf("ag-2024", "PV AG 2024")

    data = await fetcher.fetch(url_content(stored))

    assert data.startswith(b"%PDF-1.4")
    assert hashlib.sha256(data).hexdigest() == stored.sha256
    assert docstore.request_count("ag-2024") == 1


async def test_a_host_off_the_allowlist_is_never_contacted(docstore: DocumentStore) -> None:
    stored = docstore.add_pdf("ag-2024", "PV AG 2024")
    async with ContentFetcher(allowed_hosts=["lsc.example"], max_bytes=MAX_BYTES) as fetcher:
        assert await reason_of(fetcher, url_content(stored)) == "host_not_allowed"

    assert docstore.request_count() == 0


async def test_the_allowlist_port_is_enforced_when_given(docstore: DocumentStore) -> None:
    stored = docstore.add_pdf("ag-2024", "PV AG 2024")
    other_port = f"127.0.0.1:{docstore.port + 1 if docstore.port < 65535 else 1}"
    async with ContentFetcher(allowed_hosts=[other_port], max_bytes=MAX_BYTES) as fetcher:
        assert await reason_of(fetcher, url_content(stored)) == "host_not_allowed"
    async with ContentFetcher(allowed_hosts=["127.0.0.1"], max_bytes=MAX_BYTES) as fetcher:
        assert (await fetcher.fetch(url_content(stored))).startswith(b"%PDF")


async def test_a_wrong_sha256_is_refused(fetcher: ContentFetcher, docstore: DocumentStore) -> None:
    stored = docstore.add_pdf("ag-2024", "PV AG 2024")

    reason = await reason_of(fetcher, url_content(stored, sha256="0" * 64))

    assert reason == "sha256_mismatch"


@pytest.mark.parametrize("hide_length", [False, True], ids=["content-length", "chunked"])
async def test_a_wrong_size_is_refused(
    fetcher: ContentFetcher, docstore: DocumentStore, hide_length: bool
) -> None:
    stored = docstore.add_pdf("ag-2024", "PV AG 2024")
    docstore.hide_length("ag-2024", hide_length)

    for size in (stored.size - 1, stored.size + 1):
        assert await reason_of(fetcher, url_content(stored, size=size)) == "size_mismatch"


async def test_a_declared_size_over_the_limit_is_refused_without_fetching(
    docstore: DocumentStore,
) -> None:
    stored = docstore.add_pdf("ag-2024", "PV AG 2024")
    async with ContentFetcher(allowed_hosts=["127.0.0.1"], max_bytes=100) as fetcher:
        assert await reason_of(fetcher, url_content(stored)) == "too_large"

    assert docstore.request_count() == 0


async def test_a_body_that_never_ends_is_aborted_at_the_limit(
    fetcher: ContentFetcher, docstore: DocumentStore
) -> None:
    url = docstore.add_endless("endless")
    content = Content(media_type="application/pdf", size_bytes=MAX_BYTES, sha256="0" * 64, url=url)

    assert await reason_of(fetcher, content) == "too_large"


async def test_a_content_length_over_the_limit_is_refused_before_reading(
    docstore: DocumentStore,
) -> None:
    big = docstore.add_bytes("big", b"%PDF-1.4\n" + b"0" * 2_000_000)
    async with ContentFetcher(allowed_hosts=["127.0.0.1"], max_bytes=1_000_000) as fetcher:
        content = url_content(big, size=1_000_000)
        assert await reason_of(fetcher, content) == "too_large"


async def test_a_missing_document_is_not_found(
    fetcher: ContentFetcher, docstore: DocumentStore
) -> None:
    stored = docstore.add_pdf("ag-2024", "PV AG 2024")
    docstore.remove("ag-2024")

    assert await reason_of(fetcher, url_content(stored)) == "not_found"


@pytest.mark.parametrize("status", [500, 502, 503, 429])
async def test_server_errors_are_retriable(
    fetcher: ContentFetcher, docstore: DocumentStore, status: int
) -> None:
    stored = docstore.add_pdf("ag-2024", "PV AG 2024")
    docstore.set_status("ag-2024", status)

    with pytest.raises(ContentUnavailableError) as caught:
        await fetcher.fetch(url_content(stored))

    assert caught.value.retriable
    assert caught.value.reason == "unavailable"


async def test_a_slow_store_times_out_as_retriable(docstore: DocumentStore) -> None:
    stored = docstore.add_bytes("slow", b"%PDF-1.4\n" + b"0" * 100_000)
    docstore.set_slow("slow", chunk_delay_s=5)
    async with ContentFetcher(
        allowed_hosts=["127.0.0.1"], max_bytes=MAX_BYTES, timeout_s=0.2
    ) as fetcher:
        with pytest.raises(ContentUnavailableError) as caught:
            await fetcher.fetch(url_content(stored))

    assert caught.value.reason == "timeout"


async def test_a_closed_store_is_retriable(docstore: DocumentStore) -> None:
    stored = docstore.add_pdf("ag-2024", "PV AG 2024")
    await docstore.close()
    async with ContentFetcher(allowed_hosts=["127.0.0.1"], max_bytes=MAX_BYTES) as fetcher:
        with pytest.raises(ContentUnavailableError) as caught:
            await fetcher.fetch(url_content(stored))

    assert caught.value.reason == "unavailable"


async def test_inline_content_is_decoded_and_checked(fetcher: ContentFetcher) -> None:
    pdf = make_pdf("Règlement de copropriété")

    assert await fetcher.fetch(inline_content(pdf)) == pdf


@pytest.mark.parametrize(
    "encoded",
    ["%%%not base64%%%", "JVBERi0xLjQK\nJVBE", "JVBERi0xLjQ"],
    ids=["alphabet", "newline", "padding"],
)
async def test_inline_content_must_be_strict_base64(fetcher: ContentFetcher, encoded: str) -> None:
    # The event model already refuses these (its own check runs on replace too); the fetcher
    # does not rely on it.
    content = msgspec.structs.replace(inline_content(b"%PDF-1.4\n"))
    msgspec.structs.force_setattr(content, "inline_base64", encoded)

    assert await reason_of(fetcher, content) == "bad_base64"


async def test_inline_content_is_checked_like_any_other(fetcher: ContentFetcher) -> None:
    pdf = make_pdf("Budget")
    declared = inline_content(pdf)
    wrong_sha = msgspec.structs.replace(declared, sha256="f" * 64)
    wrong_size = msgspec.structs.replace(declared, size_bytes=len(pdf) + 1)

    assert await reason_of(fetcher, wrong_sha) == "sha256_mismatch"
    assert await reason_of(fetcher, wrong_size) == "size_mismatch"


async def test_a_shared_session_is_left_open(docstore: DocumentStore) -> None:
    stored = docstore.add_pdf("ag-2024", "PV AG 2024")
    async with aiohttp.ClientSession() as session:
        async with ContentFetcher(
            allowed_hosts=["127.0.0.1"], max_bytes=MAX_BYTES, session=session
        ) as fetcher:
            await fetcher.fetch(url_content(stored))
        await fetcher.close()
        assert not session.closed


@pytest.mark.parametrize(
    ("entries", "url", "allowed"),
    [
        (["docs.lsc.example"], "https://docs.lsc.example/a.pdf", True),
        (["docs.lsc.example"], "https://DOCS.lsc.example:8443/a.pdf", True),
        (["docs.lsc.example:443"], "https://docs.lsc.example/a.pdf", True),
        (["docs.lsc.example:443"], "http://docs.lsc.example/a.pdf", False),
        (["docs.lsc.example"], "https://evil.docs.lsc.example/a.pdf", False),
        (["docs.lsc.example"], "https://docs.lsc.example.evil/a.pdf", False),
        (["docs.lsc.example"], "ftp://docs.lsc.example/a.pdf", False),
        (["[::1]:8082"], "http://[::1]:8082/a.pdf", True),
        ([], "https://docs.lsc.example/a.pdf", False),
    ],
)
def test_allowlist_matches_exact_hosts_and_optional_ports(
    entries: list[str], url: str, allowed: bool
) -> None:
    assert HostAllowlist(entries).allows(URL(url)) is allowed


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_content_encoding_not_asked_for_is_refused_not_inflated(
    fetcher: ContentFetcher, docstore: DocumentStore, encoding: str
) -> None:
    # Inflated, the bytes would match the event: a store could send a decompression bomb.
    stored = docstore.add_pdf("ag-2024", "PV AG 2024")
    docstore.set_encoding("ag-2024", encoding)

    assert await reason_of(fetcher, url_content(stored)) == "content_encoding"


@pytest.mark.parametrize("hide_length", [False, True], ids=["content-length", "chunked"])
async def test_more_bytes_than_declared_are_refused(
    fetcher: ContentFetcher, docstore: DocumentStore, hide_length: bool
) -> None:
    stored = docstore.add_pdf("ag-2024", "PV AG 2024")
    docstore.set_extra_bytes("ag-2024", 100_000)
    docstore.hide_length("ag-2024", hide_length)

    assert await reason_of(fetcher, url_content(stored)) == "size_mismatch"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:70000/documents/a.pdf",
        "http://[::1/documents/a.pdf",
        "https://xn--/documents/a.pdf",
    ],
    ids=["port-above-65535", "broken-ipv6", "bad-idna"],
)
async def test_a_url_the_http_stack_cannot_parse_is_a_bad_url(
    fetcher: ContentFetcher, url: str
) -> None:
    # The event model already refuses these; the fetcher does not rely on it.
    content = Content(media_type="application/pdf", size_bytes=10, sha256="0" * 64, url="http://a")
    msgspec.structs.force_setattr(content, "url", url)

    assert await reason_of(fetcher, content) == "bad_url"


async def test_a_body_that_trickles_is_bounded_by_the_fetch_timeout(
    docstore: DocumentStore,
) -> None:
    # Every chunk comes in time for a read timeout; only the bound on the whole download ends it.
    stored = docstore.add_bytes("trickle", b"%PDF-1.4\n" + b"0" * 200_000)
    docstore.set_slow("trickle", chunk_delay_s=0.05)
    async with ContentFetcher(
        allowed_hosts=["127.0.0.1"], max_bytes=MAX_BYTES, timeout_s=0.3
    ) as fetcher:
        with pytest.raises(ContentUnavailableError) as caught:
            await fetcher.fetch(url_content(stored))

    assert caught.value.reason == "timeout"
