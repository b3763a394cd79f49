"""A partition's processor: offsets stay open until work is done, and unexpected failures stop."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import cast

import orjson
from prometheus_client import CollectorRegistry

from consumer.app.processor import COMMANDS, DOCUMENTS, MANIFESTS, PartitionProcessor
from consumer.core.guard import DeletionGuard
from consumer.core.manifest import ManifestAssembler
from consumer.core.records import SourceRecord
from consumer.core.routing import RoutingTable
from consumer.core.state import StateRecord
from consumer.core.view import PublishedView
from consumer.kafka.deadletters import DeadLetterSink
from consumer.metrics import RelayMetrics
from consumer.partner.executor import OperationExecutor

AGENCY, BUILDING = "agence-a", "bat-1"
TOPICS = {DOCUMENTS: "docs", MANIFESTS: "manifests", COMMANDS: "commands"}


class BrokenChangelog:
    """A changelog whose writes fail the way an unreachable broker would."""

    async def write(self, record: StateRecord) -> None:
        await asyncio.sleep(0)
        raise ConnectionError("changelog unreachable")


def unmapped_document_event() -> bytes:
    return orjson.dumps(
        {
            "schema_version": 1,
            "event_type": "document-created",
            "event_id": str(uuid.uuid4()),
            "occurred_at": "2025-01-01T10:00:00Z",
            "agency_id": AGENCY,
            "building_id": BUILDING,
            "document": {
                "id": f"{uuid.uuid4()}:1",
                "module": "ag",
                "category": "PV",
                "title": "PV AG",
                "document_date": "2025-01-01",
                "audience": "building",
                "content": {
                    "media_type": "application/pdf",
                    "size_bytes": 10,
                    "sha256": "a" * 64,
                    "url": "https://lsc.example/d.pdf",
                },
            },
        }
    )


async def test_work_that_fails_unexpectedly_keeps_its_offset_open_and_reports_the_failure() -> None:
    failed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
    routing = RoutingTable.from_mapping(
        {"agencies": {AGENCY: {"modules": ["ag"], "first_publication": "history"}}}
    )
    processor = PartitionProcessor(
        partition=0,
        topics=TOPICS,
        view=PublishedView(),
        assembler=ManifestAssembler(expiry=dt.timedelta(hours=1), max_pending_items=1000),
        routing=routing,
        guard=DeletionGuard(max_share=0.5, min_count=3),
        executor=cast(OperationExecutor, None),  # an unmapped building plans no partner call
        writer=BrokenChangelog(),
        dead_letters=cast(DeadLetterSink, None),
        metrics=RelayMetrics.create(CollectorRegistry(), version="test"),
        max_value_bytes=1 << 20,
        clock=lambda: dt.datetime.now(dt.UTC),
        on_failure=failed.set_result,
    )
    source = SourceRecord(
        topic="docs",
        partition=0,
        offset=7,
        timestamp_ms=0,
        key=f"{AGENCY}:{BUILDING}".encode(),
        value=unmapped_document_event(),
        headers=(),
    )

    await processor.handle(source)  # parks the document: one state record to write
    error = await asyncio.wait_for(failed, timeout=5)

    assert isinstance(error, ConnectionError)
    assert processor.committable() == {"docs": 7}  # the record is read again after the restart
