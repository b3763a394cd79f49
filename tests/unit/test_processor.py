"""A partition's processor: offsets stay open until work is done; only infrastructure stops it.

A changelog that cannot be written stops the relay (the record is read again after the restart);
a record whose handling fails in a way no edge foresaw is dead-lettered and its offset released.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Callable
from typing import cast

import orjson
import pytest
from aiokafka.errors import KafkaTimeoutError
from prometheus_client import CollectorRegistry

from consumer.events import Document
from consumer.executor import OperationExecutor, RecordWriter
from consumer.guard import DeletionGuard
from consumer.manifest import ManifestAssembler
from consumer.metrics import RelayMetrics
from consumer.processor import COMMANDS, DOCUMENTS, MANIFESTS, PartitionProcessor
from consumer.routing import RoutingTable, Verdict
from consumer.sinks import DeadLetterSink, SourceRecord
from consumer.state import StateRecord
from consumer.view import PublishedView

AGENCY, BUILDING = "agence-a", "bat-1"
TOPICS = {DOCUMENTS: "docs", MANIFESTS: "manifests", COMMANDS: "commands"}


class BrokenChangelog:
    """A changelog whose writes fail the way an unreachable broker does, retries spent."""

    async def write(self, record: StateRecord) -> None:
        await asyncio.sleep(0)
        raise KafkaTimeoutError("changelog unreachable")


class RecordingDeadLetters:
    def __init__(self) -> None:
        self.sent: list[tuple[SourceRecord, str, str]] = []

    async def send(self, source: SourceRecord, *, reason: str, detail: str) -> None:
        self.sent.append((source, reason, detail))


class NoChangelog:
    async def write(self, record: StateRecord) -> None:
        raise AssertionError("nothing to write")


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


def processor_with(
    *,
    writer: object,
    dead_letters: object = None,
    on_failure: Callable[[BaseException], None] = lambda error: None,
    routing: RoutingTable | None = None,
) -> PartitionProcessor:
    return PartitionProcessor(
        partition=0,
        topics=TOPICS,
        view=PublishedView(),
        assembler=ManifestAssembler(expiry=dt.timedelta(hours=1), max_pending_items=1000),
        routing=routing or ROUTING,
        guard=DeletionGuard(max_share=0.5, min_count=3),
        executor=cast(OperationExecutor, None),  # an unmapped building plans no partner call
        writer=cast(RecordWriter, writer),
        dead_letters=cast(DeadLetterSink, dead_letters),
        metrics=RelayMetrics.create(CollectorRegistry(), version="test"),
        max_value_bytes=1 << 20,
        clock=lambda: dt.datetime.now(dt.UTC),
        on_failure=on_failure,
    )


ROUTING = RoutingTable.from_mapping(
    {"agencies": {AGENCY: {"modules": ["ag"], "first_publication": "history"}}}
)


def source_at(offset: int) -> SourceRecord:
    return SourceRecord(
        topic="docs",
        partition=0,
        offset=offset,
        timestamp_ms=0,
        key=f"{AGENCY}:{BUILDING}".encode(),
        value=unmapped_document_event(),
        headers=(),
    )


async def test_a_changelog_that_cannot_be_written_stops_the_relay_and_keeps_the_offset_open() -> (
    None
):
    failed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
    processor = processor_with(writer=BrokenChangelog(), on_failure=failed.set_result)

    await processor.handle(source_at(7))  # parks the document: one state record to write
    error = await asyncio.wait_for(failed, timeout=5)

    assert isinstance(error, KafkaTimeoutError)
    assert processor.committable() == {"docs": 7}  # the record is read again after the restart


class BrokenRouting(RoutingTable):
    """Routing with a bug: deciding raises what no edge foresaw."""

    def decide(self, agency_id: str, building_id: str, document: Document) -> Verdict:
        raise KeyError("a bug in routing")


async def test_a_record_whose_planning_fails_unexpectedly_is_dead_lettered_and_released(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures: list[BaseException] = []
    dead_letters = RecordingDeadLetters()
    routing = BrokenRouting(agencies=ROUTING.agencies)
    processor = processor_with(
        writer=NoChangelog(), dead_letters=dead_letters, on_failure=failures.append, routing=routing
    )

    await processor.handle(source_at(7))

    assert [(source.offset, reason) for source, reason, _ in dead_letters.sent] == [
        (7, "unexpected_error")
    ]
    assert "KeyError" in dead_letters.sent[0][2]
    assert processor.committable() == {"docs": 8}
    assert failures == []
    logged = [r for r in caplog.records if r.message == "input record set aside"]
    assert len(logged) == 1
    assert logged[0].exc_info is not None  # with its traceback
