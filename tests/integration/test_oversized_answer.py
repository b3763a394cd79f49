"""A create answered with more than the partner's answers may hold is looked up, not sent again.

The partner carried the create out, but its answer is too large to read: the relay does not count
it a success, and its next attempt looks the document up by reference, finds it, and records it
as published, with one copy on the partner. A real client, executor and scheduler against a
loopback partner; the document store is a stand-in.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from consumer.core.events import Content, Document
from consumer.core.planning.plan import Lane, Upload
from consumer.core.records import SourceRecord
from consumer.core.state import DocKey, DocStatus, StateRecord
from consumer.core.view import PublishedView
from consumer.kafka.deadletters import DeadLetterSink
from consumer.metrics import RelayMetrics
from consumer.partner.client import JSON_API, ChouetteCoproClient
from consumer.partner.content import ContentStage
from consumer.partner.executor import OperationExecutor
from consumer.partner.keys import ApiKeyStore
from consumer.partner.scheduler import RateLimit, RetryPolicy, Scheduler
from tests.writers import WritesAtOnce

AGENCY = "agence-a"
PDF = b"%PDF-1.4 contrat"
KEY = DocKey(AGENCY, "bat-1", "evt-1:att-1")
SOURCE = SourceRecord("documents", 0, 7, 0, b"agence-a:bat-1", b"{}", ())


@dataclass
class Partner:
    """Creates documents and finds them by reference; the first create's answer is padded to
    ``padding`` bytes of blanks, beyond what the relay reads."""

    padding: int
    documents: dict[str, dict[str, Any]] = field(default_factory=dict)
    received: list[str] = field(default_factory=list)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append(request.method)
        if request.method == "GET":
            reference = request.query.get("filter[reference]")
            found = [
                d for d in self.documents.values() if d["attributes"]["reference"] == reference
            ]
            return web.json_response({"data": found}, content_type=JSON_API)
        form = await request.post()
        data = form["data"]
        assert isinstance(data, str | bytes | bytearray), data
        attributes = orjson.loads(data)["data"]["attributes"]
        resource = {
            "type": "documents",
            "id": f"doc-{next(self.ids):06d}",
            "attributes": attributes,
        }
        self.documents[resource["id"]] = resource
        padding, self.padding = self.padding, 0
        body = b" " * padding + orjson.dumps({"data": resource})
        return web.Response(status=201, body=body, headers={"Content-Type": JSON_API})


@pytest.fixture
async def partner() -> AsyncIterator[tuple[Partner, str]]:
    server_side = Partner(padding=8 * 1024 * 1024)
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", server_side.handle)
    async with TestServer(app) as server:
        yield server_side, str(server.make_url("/api/v1"))


class Changelog(WritesAtOnce):
    def __init__(self) -> None:
        self.records: list[StateRecord] = []

    async def write(self, record: StateRecord) -> None:
        self.records.append(record)


async def fetch(content: Content) -> bytes:
    return PDF


def contract() -> Upload:
    document = msgspec.convert(
        {
            "id": KEY.document_id,
            "module": "contrats",
            "category": "Contrat",
            "title": "Contrat d'entretien",
            "document_date": "2025-01-01",
            "audience": "building",
            "content": {
                "media_type": "application/pdf",
                "size_bytes": len(PDF),
                "sha256": hashlib.sha256(PDF).hexdigest(),
                "url": "https://lsc.example/contrat.pdf",
            },
        },
        type=Document,
    )
    return Upload(KEY, document, "c-1", Lane.LIVE, dt.datetime(2025, 1, 1, tzinfo=dt.UTC))


async def test_a_create_answered_beyond_the_limit_is_looked_up_and_published_once(
    partner: tuple[Partner, str],
) -> None:
    server_side, base_url = partner
    view = PublishedView()
    client = ChouetteCoproClient(
        base_url=base_url, api_keys=ApiKeyStore.from_mapping({AGENCY: "key-a"}), timeout_s=30
    )
    scheduler = Scheduler(
        concurrency=2,
        default_rate_limit=RateLimit(rate_per_second=1000, burst=100),
        retry=RetryPolicy(base_seconds=0.01, cap_seconds=0.05),
    )
    async with client, scheduler:
        executor = OperationExecutor(
            view=view,
            writer=Changelog(),
            scheduler=scheduler,
            partner=client,
            content=ContentStage(fetch=fetch, per_agency=8),
            dead_letters=cast(DeadLetterSink, None),
            metrics=RelayMetrics.create(CollectorRegistry(), version="test"),
        )
        batch = executor.submit([contract()], source=SOURCE)
        await asyncio.wait_for(batch.future, timeout=20)

    assert server_side.received == ["POST", "GET"]  # not sent again: the lookup found it
    assert list(server_side.documents) == ["doc-000001"]
    published = view.document(KEY)
    assert published is not None
    assert (published.status, published.remote_id) == (DocStatus.PUBLISHED, "doc-000001")
