"""HTTPS to ChouetteCopro and the document store: verified; a CA file adds what is trusted.

Behind a corporate TLS proxy, certificates come from the company's CA. With its PEM bundle in
``PARTNER__CA_FILE`` / ``CONTENT__CA_FILE`` the relay trusts it; without, it refuses the server.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from consumer.core.events import Content
from consumer.errors import ContentUnavailableError, PartnerRetriableError
from consumer.local.docstore import DocumentStore
from consumer.local.sandbox import SandboxServer
from consumer.local.tls import Pki, make_pki
from consumer.partner.client import ChouetteCoproClient
from consumer.partner.content import ContentFetcher
from consumer.partner.keys import ApiKeyStore
from consumer.partner.tls import https_context
from tests.fixtures.partner import AGENCY_A_KEY
from tests.fixtures.tls import TlsFront

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def https_sandbox(sandbox: SandboxServer, pki: Pki) -> AsyncIterator[str]:
    """The sandbox's API root over HTTPS, with a certificate of the test's own CA."""
    async with TlsFront(sandbox.port, pki.broker_keystore) as front:
        yield f"https://127.0.0.1:{front.port}/api/v1"


def client(base_url: str, ca_file: Path | None) -> ChouetteCoproClient:
    return ChouetteCoproClient(
        base_url=base_url,
        api_keys=ApiKeyStore.from_mapping({"agence-a": AGENCY_A_KEY}),
        timeout_s=5.0,
        ssl_context=https_context(ca_file, "PARTNER__CA_FILE"),
    )


async def test_chouettecopro_behind_a_private_ca_is_trusted_with_its_ca_file(
    https_sandbox: str, pki: Pki
) -> None:
    async with client(https_sandbox, pki.ca_file) as partner:
        found = await partner.find_by_reference(
            agency_id="agence-a", condominium_id="c-1", reference="evt-1:att-1"
        )
    assert found is None  # the call went through: the sandbox answered an empty list


async def test_chouettecopro_behind_a_private_ca_is_refused_without_it(
    https_sandbox: str,
) -> None:
    async with client(https_sandbox, None) as partner:
        with pytest.raises(PartnerRetriableError, match="Certificate"):
            await partner.find_by_reference(
                agency_id="agence-a", condominium_id="c-1", reference="evt-1:att-1"
            )


async def test_documents_behind_a_private_ca_are_fetched_only_with_its_ca_file(
    docstore: DocumentStore, pki: Pki
) -> None:
    stored = docstore.add_pdf("pv-ag", "PV AG")
    async with TlsFront(docstore.port, pki.broker_keystore) as front:
        url = f"https://127.0.0.1:{front.port}/documents/pv-ag.pdf"
        content = Content(
            media_type="application/pdf", size_bytes=stored.size, sha256=stored.sha256, url=url
        )
        hosts = [f"127.0.0.1:{front.port}"]
        trusted = https_context(pki.ca_file, "CONTENT__CA_FILE")
        async with ContentFetcher(allowed_hosts=hosts, max_bytes=10**6, ssl_context=trusted) as f:
            data = await f.fetch(content)
        assert hashlib.sha256(data).hexdigest() == stored.sha256
        async with ContentFetcher(allowed_hosts=hosts, max_bytes=10**6) as fetcher:
            with pytest.raises(ContentUnavailableError, match="certificate verify failed"):
                await fetcher.fetch(content)
