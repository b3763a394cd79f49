"""A manifest becomes durable only after the document work of its building it counted on.

A manifest is planned against the view as it will be once the operations already queued are
done (an upload queued for a document event shows as ``uploading``). If its building record (the
``taken_at`` that decides the building's modules) reached the changelog while such an operation
was still pending, a relay that died then would read the document event again, find it decided by
that manifest, and never carry it out: the document would be lost. So the building record, and
the manifest's offsets, wait for the building's pending work, as they wait for the manifest's own.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from collections.abc import Awaitable, Iterable
from typing import Any, cast

import orjson
from prometheus_client import CollectorRegistry

from consumer.app.processor import COMMANDS, DOCUMENTS, MANIFESTS, PartitionProcessor
from consumer.core.events import Module
from consumer.core.guard import DeletionGuard
from consumer.core.manifest import ManifestAssembler
from consumer.core.planning.plan import Delete, Upload, deleted_record, intent_record
from consumer.core.records import SourceRecord
from consumer.core.routing import RoutingTable
from consumer.core.state import (
    BuildingRecord,
    DocKey,
    DocStatus,
    DocumentRecord,
    StateRecord,
)
from consumer.core.view import PublishedView
from consumer.kafka.deadletters import DeadLetterSink
from consumer.metrics import RelayMetrics
from consumer.partner.executor import OperationExecutor
from consumer.partner.window import Batch
from tests.writers import WritesAtOnce

AGENCY, BUILDING = "agence-a", "bat-1"
TOPICS = {DOCUMENTS: "docs", MANIFESTS: "manifests", COMMANDS: "commands"}
CLOCK = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
CREATED = CLOCK - dt.timedelta(minutes=10)
TAKEN = CLOCK - dt.timedelta(minutes=5)


class RecordingChangelog(WritesAtOnce):
    """Keeps what is written, in order: what a relay started after a crash would restore."""

    def __init__(self) -> None:
        self.records: list[StateRecord] = []

    async def write(self, record: StateRecord) -> None:
        self.records.append(record)


class StalledPartner:
    """An executor whose operations never end, as while the partner is unreachable."""

    def __init__(self, view: PublishedView, changelog: RecordingChangelog) -> None:
        self.view = view
        self.changelog = changelog
        self.submitted: list[Upload | Delete] = []
        self._never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def pending(self) -> int:
        return len(self.submitted)

    def submit(self, operations: Iterable[Upload | Delete], *, source: SourceRecord) -> Batch:
        batch = Batch(source, 0, self._never)
        for operation in operations:
            self.submitted.append(operation)
            batch.remaining += 1
            # As the real executor does: the view shows the intended state at once.
            record = intent_record(operation) if isinstance(operation, Upload) else None
            self.view.apply(
                record if record is not None else deleted_record(cast(Delete, operation))
            )
        return batch

    def write_after(self, record: StateRecord) -> Awaitable[object]:
        # As the real executor does: behind the work queued on the document, here for ever.
        if any(op.key == record.key for op in self.submitted):
            return self._never
        return self.changelog.write(record)

    def queue_after(self, record: StateRecord) -> asyncio.Future[None] | None:
        # As the real executor does: behind the work queued on the document, here for ever.
        return self._never if any(op.key == record.key for op in self.submitted) else None

    async def cancel_all(self) -> None:
        self._never.cancel()


def processor(view: PublishedView, partner: StalledPartner, changelog: RecordingChangelog) -> Any:
    routing = RoutingTable.from_mapping(
        {
            "agencies": {
                AGENCY: {
                    "modules": ["ag"],
                    "first_publication": "history",
                    "condominia": {BUILDING: "c-1"},
                }
            }
        }
    )
    return PartitionProcessor(
        partition=0,
        topics=TOPICS,
        view=view,
        assembler=ManifestAssembler(expiry=dt.timedelta(hours=1), max_pending_items=1000),
        routing=routing,
        guard=DeletionGuard(max_share=0.5, min_count=3),
        executor=cast(OperationExecutor, partner),
        writer=changelog,
        dead_letters=cast(DeadLetterSink, None),
        metrics=RelayMetrics.create(CollectorRegistry(), version="test"),
        max_value_bytes=1 << 20,
        clock=lambda: CLOCK,
        on_failure=lambda error: None,
    )


DOCUMENT = {
    "id": "pv-ag-2025:1",
    "module": "ag",
    "category": "PV",
    "title": "PV AG 2025",
    "document_date": "2025-02-01",
    "audience": "building",
    "content": {
        "media_type": "application/pdf",
        "size_bytes": 10,
        "sha256": hashlib.sha256(b"pv").hexdigest(),
        "url": "https://lsc.example/pv.pdf",
    },
}


def record(topic: str, offset: int, body: dict[str, Any]) -> SourceRecord:
    return SourceRecord(
        topic=topic,
        partition=0,
        offset=offset,
        timestamp_ms=int(CLOCK.timestamp() * 1000),
        key=f"{AGENCY}:{BUILDING}".encode(),
        value=orjson.dumps(body),
        headers=(),
    )


DOCUMENT_CREATED = record(
    "docs",
    5,
    {
        "schema_version": 1,
        "event_type": "document-created",
        "event_id": "8b0e1c9e-5d2f-4f57-9a8e-3f1d2c4b5a69",
        "occurred_at": CREATED.isoformat(),
        "agency_id": AGENCY,
        "building_id": BUILDING,
        "document": DOCUMENT,
    },
)
MANIFEST = record(
    "manifests",
    9,
    {
        "schema_version": 1,
        "event_type": "manifest-snapshot",
        "snapshot_id": "0f6f1c39-93a4-4d51-8d59-2f8a7c0e6b11",
        "taken_at": TAKEN.isoformat(),
        "agency_id": AGENCY,
        "building_id": BUILDING,
        "modules": ["ag"],
        "part": 1,
        "parts": 1,
        "item_count": 1,
        "items": [DOCUMENT],
    },
)


async def settle() -> None:
    """Let the processor's completion tasks run as far as they can (nothing here does I/O)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_document_whose_upload_was_pending_when_the_relay_died_is_uploaded_after() -> None:
    view, partner, changelog = PublishedView(), None, RecordingChangelog()
    partner = StalledPartner(view, changelog)
    first = processor(view, partner, changelog)
    await first.handle(DOCUMENT_CREATED)  # an upload, stalled: the partner is away
    await first.handle(MANIFEST)  # lists the document: nothing more to do for it
    await settle()

    # The manifest counted on the pending upload: it is not done before it.
    assert first.committable() == {"docs": 5, "manifests": 9}

    # The relay dies. The next one restores what the changelog holds and reads both again.
    restored = PublishedView()
    for written in changelog.records:
        restored.apply(written)
    again = StalledPartner(restored, RecordingChangelog())
    second = processor(restored, again, again.changelog)
    await second.handle(DOCUMENT_CREATED)

    assert [op.key.document_id for op in again.submitted] == [DOCUMENT["id"]]


async def test_a_withdrawal_pending_when_a_newer_manifest_forgets_the_document_is_done_after() -> (
    None
):
    changelog = RecordingChangelog()
    earlier = CREATED - dt.timedelta(minutes=5)  # published, its first publication done
    changelog.records.append(BuildingRecord(AGENCY, BUILDING, {Module.AG: earlier}, True))
    changelog.records.append(
        DocumentRecord(
            key=DocKey(AGENCY, BUILDING, "pv-ag-2025:1"),
            status=DocStatus.PUBLISHED,
            sha256=hashlib.sha256(b"pv").hexdigest(),
            module=Module.AG,
            seen_at=earlier,
            document_date=dt.date(2025, 2, 1),
            size_bytes=10,
            remote_id="r-1",
            condominium_id="c-1",
        )
    )
    view = restored(changelog)
    partner = StalledPartner(view, changelog)
    first = processor(view, partner, changelog)
    await first.handle(OWNERS_ONLY)  # a withdrawal, stalled: the partner is away
    await first.handle(WITHOUT_IT)  # a newer manifest leaves the document out: forgotten
    await settle()

    # Forgetting it waits for the withdrawal: the relay dies, the next one withdraws it.
    again = StalledPartner(restored(changelog), RecordingChangelog())
    second = processor(again.view, again, again.changelog)
    await second.handle(OWNERS_ONLY)
    assert [(type(op), op.key.document_id) for op in again.submitted] == [(Delete, DOCUMENT["id"])]


def restored(changelog: RecordingChangelog) -> PublishedView:
    """The view a relay started after a crash restores from what the changelog holds."""
    view = PublishedView()
    for written in changelog.records:
        view.apply(written)
    return view


OWNERS_ONLY = record(
    "docs",
    6,
    {
        **orjson.loads(DOCUMENT_CREATED.value or b"{}"),
        "event_id": "5a0f3c1e-7d2b-4e8a-9c6f-1b2d3e4f5a6b",
        "document": {**DOCUMENT, "audience": "individual"},
    },
)
OTHER = {**DOCUMENT, "id": "contrat-2025:1", "title": "Contrat"}
WITHOUT_IT = record(
    "manifests",
    10,
    {
        **orjson.loads(MANIFEST.value or b"{}"),
        "snapshot_id": "7c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f",
        "items": [OTHER],
    },
)


async def test_an_event_a_pending_manifest_decided_stays_uncommitted_until_it_is_recorded() -> None:
    changelog = RecordingChangelog()
    earlier = CREATED - dt.timedelta(minutes=20)  # an earlier manifest: no first publication
    changelog.records.append(BuildingRecord(AGENCY, BUILDING, {Module.AG: earlier}, True))
    view = restored(changelog)
    partner = StalledPartner(view, changelog)
    first = processor(view, partner, changelog)
    await first.handle(MANIFEST)  # lists the document: its upload, stalled
    created_before = dict(orjson.loads(DOCUMENT_CREATED.value or b"{}"))
    other = {**DOCUMENT, "id": "pv-ag-2024:1"}  # created before the snapshot, not listed
    created_before |= {"event_id": "5d0f7c1e-1111-4f57-9a8e-3f1d2c4b5a69", "document": other}
    left_out = record("docs", 7, created_before)
    await first.handle(left_out)  # decided by the manifest: not published
    await settle()

    # Had its offset been released, a relay dying now would never publish it, whatever the
    # manifest read again decides (the guard may hold it, and a discard then sends the document).
    assert first.committable() == {"docs": 7, "manifests": 9}
    assert [op.key.document_id for op in partner.submitted] == [DOCUMENT["id"]]
