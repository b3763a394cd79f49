"""A partition's processor: offsets stay open until work is done; only infrastructure stops it.

A changelog that cannot be written stops the relay (the record is read again after the restart);
a record whose handling fails in a way no edge foresaw is dead-lettered and its offset released.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from typing import cast

import orjson
import pytest
from aiokafka.errors import KafkaTimeoutError
from prometheus_client import CollectorRegistry

from consumer.app.processor import COMMANDS, DOCUMENTS, MANIFESTS, PartitionProcessor
from consumer.core.events import Document
from consumer.core.guard import DeletionGuard
from consumer.core.manifest import ManifestAssembler
from consumer.core.records import SourceRecord
from consumer.core.routing import RoutingTable, Verdict
from consumer.core.state import StateRecord
from consumer.core.view import PublishedView
from consumer.kafka.deadletters import DeadLetterSink
from consumer.metrics import RelayMetrics
from consumer.partner.executor import OperationExecutor, RecordWriter
from tests.writers import WritesAtOnce

AGENCY, BUILDING = "agence-a", "bat-1"
TOPICS = {DOCUMENTS: "docs", MANIFESTS: "manifests", COMMANDS: "commands"}


class BrokenChangelog(WritesAtOnce):
    """A changelog whose writes fail the way an unreachable broker does, retries spent."""

    async def write(self, record: StateRecord) -> None:
        await asyncio.sleep(0)
        raise KafkaTimeoutError("changelog unreachable")


class RecordingDeadLetters:
    def __init__(self) -> None:
        self.sent: list[tuple[SourceRecord, str, str]] = []

    async def send(self, source: SourceRecord, *, reason: str, detail: str) -> None:
        self.sent.append((source, reason, detail))


class NoChangelog(WritesAtOnce):
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


class NothingQueued:
    """An executor without partner work: a record is written at once."""

    def __init__(self, writer: RecordWriter) -> None:
        self._writer = writer

    def write_after(self, record: StateRecord) -> Awaitable[object]:
        return self._writer.write(record)

    def queue_after(self, record: StateRecord) -> None:
        return None  # nothing is ever queued: the processor writes the record at once


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
        # An unmapped building plans no partner call: nothing is ever queued on a document.
        executor=cast(OperationExecutor, NothingQueued(cast(RecordWriter, writer))),
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


class RecordedDeadLetters:
    """A dead-letter sink that keeps what it is given."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, str]] = []

    async def send(self, source: SourceRecord, *, reason: str, detail: str) -> None:
        self.sent.append((source.offset, reason))


CLOCK = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


def processor_at(clock: list[dt.datetime], dead_letters: RecordedDeadLetters) -> PartitionProcessor:
    routing = RoutingTable.from_mapping(
        {"agencies": {AGENCY: {"modules": ["ag"], "first_publication": "history"}}}
    )
    return PartitionProcessor(
        partition=0,
        topics=TOPICS,
        view=PublishedView(),
        assembler=ManifestAssembler(expiry=dt.timedelta(hours=1), max_pending_items=1000),
        routing=routing,
        guard=DeletionGuard(max_share=0.5, min_count=3),
        executor=cast(OperationExecutor, NothingQueued(BrokenChangelog())),
        writer=BrokenChangelog(),
        dead_letters=cast(DeadLetterSink, dead_letters),
        metrics=RelayMetrics.create(CollectorRegistry(), version="test"),
        max_value_bytes=1 << 20,
        clock=lambda: clock[0],
        on_failure=lambda error: None,
        max_clock_skew=dt.timedelta(minutes=5),
    )


def manifest_record(
    offset: int, published: dt.datetime, *, taken_at: dt.datetime, building: str = BUILDING
) -> SourceRecord:
    body = {
        "schema_version": 1,
        "event_type": "manifest-snapshot",
        "snapshot_id": str(uuid.uuid4()),
        "taken_at": taken_at.isoformat(),
        "agency_id": AGENCY,
        "building_id": building,
        "modules": ["ag"],
        "part": 1,
        "parts": 2,  # its sibling never comes
        "item_count": 0,
        "items": [],
    }
    return SourceRecord(
        topic="manifests",
        partition=0,
        offset=offset,
        timestamp_ms=int(published.timestamp() * 1000),
        key=f"{AGENCY}:{building}".encode(),
        value=orjson.dumps(body),
        headers=(),
    )


async def test_an_orphan_part_expires_an_hour_after_it_was_published_not_after_it_was_read() -> (
    None
):
    clock = [CLOCK]
    processor = processor_at(clock, RecordedDeadLetters())
    published = CLOCK - dt.timedelta(minutes=61)  # read again after a restart, say
    await processor.handle(manifest_record(3, published, taken_at=published))
    assert processor.committable() == {"manifests": 3}

    processor.expire(caught_up=True)

    assert processor.committable() == {"manifests": 4}


async def test_while_records_remain_to_be_read_expiry_counts_in_record_time() -> None:
    clock = [CLOCK]
    processor = processor_at(clock, RecordedDeadLetters())
    old = CLOCK - dt.timedelta(hours=5)  # a backlog: the relay was away for hours
    await processor.handle(manifest_record(3, old, taken_at=old))
    processor.expire(caught_up=False)
    assert processor.committable() == {"manifests": 3}  # its sibling may be the next record

    later = old + dt.timedelta(hours=1)
    await processor.handle(manifest_record(4, later, taken_at=later, building="bat-2"))
    processor.expire(caught_up=False)
    assert processor.committable() == {"manifests": 4}  # an hour of records later, given up


async def test_a_manifest_taken_beyond_the_clock_skew_is_a_dead_letter() -> None:
    clock = [CLOCK]
    dead_letters = RecordedDeadLetters()
    processor = processor_at(clock, dead_letters)
    future = CLOCK + dt.timedelta(minutes=5, seconds=1)
    await processor.handle(manifest_record(8, CLOCK, taken_at=future))
    assert dead_letters.sent == [(8, "taken_at_in_future")]
    assert processor.committable() == {"manifests": 9}
    await processor.handle(manifest_record(9, CLOCK, taken_at=CLOCK + dt.timedelta(minutes=5)))
    assert dead_letters.sent == [(8, "taken_at_in_future")]  # within the skew: kept, pending


async def test_a_record_timestamp_beyond_any_date_does_not_break_the_processor() -> None:
    clock = [CLOCK]
    processor = processor_at(clock, RecordedDeadLetters())
    record = manifest_record(3, CLOCK, taken_at=CLOCK)
    await processor.handle(record._replace(timestamp_ms=2**62))
    processor.expire(caught_up=True)
    assert processor.committable() == {"manifests": 3}  # counted from the clock, an hour to go


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


class AcceptingChangelog(WritesAtOnce):
    async def write(self, record: StateRecord) -> None:
        await asyncio.sleep(0)


async def test_every_record_of_a_fetch_is_handled_and_counted_even_after_a_poison_one() -> None:
    dead_letters = RecordingDeadLetters()
    processor = processor_with(writer=AcceptingChangelog(), dead_letters=dead_letters)
    poison = source_at(2)._replace(value=b"not json")

    await processor.handle_batch([source_at(1), poison, source_at(3)])

    assert [(source.offset, reason) for source, reason, _ in dead_letters.sent] == [(2, "not_json")]

    async def all_done() -> None:
        while processor.committable() != {"docs": 4}:  # noqa: ASYNC110 - no event to await
            await asyncio.sleep(0)  # the parked documents' state records are being written

    await asyncio.wait_for(all_done(), timeout=5)
    counted = {
        sample.labels["outcome"]: sample.value
        for metric in processor._metrics.events.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }
    assert counted == {"parked": 2, "dead_lettered": 1}  # an unmapped building parks them
