"""The published view: changed only by state records, compact, and answering what planning asks."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import tracemalloc
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.core.events import Document, Module
from consumer.core.state import (
    BuildingKey,
    BuildingRecord,
    DocKey,
    DocStatus,
    DocumentRecord,
    StateRecord,
    Tombstone,
    encode_state,
)
from consumer.core.view import PublishedView
from tests.strategies import document_ids, identifiers

T0 = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)


def record(document_id: str = "d1", building: str = "bat-12", **changes: Any) -> DocumentRecord:
    fields: dict[str, Any] = {
        "key": DocKey("agence-lyon", building, document_id),
        "status": DocStatus.PUBLISHED,
        "sha256": hashlib.sha256(document_id.encode()).hexdigest(),
        "module": Module.AG,
        "seen_at": T0,
        "document_date": dt.date(2024, 5, 1),
        "size_bytes": 52_000,
        "remote_id": f"r-{document_id}",
        "condominium_id": "8841",
    }
    return DocumentRecord(**(fields | changes))


def view_of(*records: StateRecord) -> PublishedView:
    view = PublishedView()
    for item in records:
        view.apply(item)
    return view


def test_a_record_applied_is_found_exactly_as_it_was() -> None:
    stored = record(held_by=None)
    view = view_of(stored)
    assert view.document(stored.key) == stored
    assert view.document(DocKey("agence-lyon", "bat-12", "other")) is None
    assert view.document(DocKey("agence-lyon", "bat-99", "d1")) is None


def test_a_later_record_replaces_and_a_tombstone_forgets() -> None:
    first = record()
    second = record(sha256=hashlib.sha256(b"v2").hexdigest(), remote_id="r-2")
    view = view_of(first, second)
    assert view.document(first.key) == second
    assert view.size == 1
    view.apply(Tombstone(first.key))
    assert view.document(first.key) is None
    assert view.size == 0
    assert list(view.buildings()) == []  # nothing is kept for an empty building


def test_building_records_are_kept_beside_documents() -> None:
    building = BuildingRecord("agence-lyon", "bat-12", {Module.AG: T0}, True)
    view = view_of(building, record())
    assert view.building("agence-lyon", "bat-12") == building
    view.apply(Tombstone(record().key))
    assert list(view.buildings()) == [BuildingKey("agence-lyon", "bat-12")]
    view.apply(Tombstone(BuildingKey("agence-lyon", "bat-12")))
    assert view.building("agence-lyon", "bat-12") is None


def test_counts_follow_status_changes() -> None:
    view = view_of(
        record("d1"),
        record("d2", status=DocStatus.BASELINE, remote_id=None),
        record("d3", status=DocStatus.UPLOADING),
        record("d3", status=DocStatus.PUBLISHED),
        record("d4", status=DocStatus.DELETE_HELD, held_by="snap-1"),
    )
    assert view.counts() == {
        DocStatus.PUBLISHED: 2,
        DocStatus.BASELINE: 1,
        DocStatus.UPLOADING: 0,
        DocStatus.DELETE_HELD: 1,
        DocStatus.PARKED: 0,
        DocStatus.FILTERED: 0,
    }
    assert view.held_count == 1
    assert view.size == 4


def test_published_count_is_per_building_and_module_and_includes_held() -> None:
    view = view_of(
        record("d1"),
        record("d2", module=Module.CONTRATS),
        record("d3", status=DocStatus.DELETE_HELD, held_by="snap-1"),
        record("d4", status=DocStatus.BASELINE, remote_id=None),
        record("d5", status=DocStatus.UPLOADING, remote_id=None),
        record("d6", building="bat-13"),
    )
    assert view.published_count("agence-lyon", "bat-12", [Module.AG]) == 2
    assert view.published_count("agence-lyon", "bat-12", [Module.AG, Module.CONTRATS]) == 3
    assert view.published_count("agence-lyon", "bat-99", [Module.AG]) == 0
    view.apply(Tombstone(record("d1").key))
    assert view.published_count("agence-lyon", "bat-12", [Module.AG]) == 1


def test_documents_of_a_building_and_work_that_needs_attention() -> None:
    document = Document.model_validate(
        {
            "id": "d7",
            "module": "ag",
            "category": "PV",
            "title": "AG",
            "document_date": "2024-05-01",
            "audience": "building",
            "content": {
                "media_type": "application/pdf",
                "size_bytes": 10,
                "sha256": hashlib.sha256(b"d7").hexdigest(),
                "url": "https://documents.lsc.example/7.pdf",
            },
        }
    )
    parked = record(
        "d7", status=DocStatus.PARKED, parked_reason="unmapped_building", document=document
    )
    intent = record("d8", status=DocStatus.UPLOADING, remote_id=None)
    held = record("d9", status=DocStatus.DELETE_HELD, held_by="snap-1")
    view = view_of(record("d1"), parked, intent, held, record("d2", building="bat-13"))
    assert {r.key.document_id for r in view.documents("agence-lyon", "bat-12")} == {
        "d1",
        "d7",
        "d8",
        "d9",
    }
    assert list(view.parked()) == [parked]
    assert list(view.uploading()) == [intent]
    assert list(view.with_status(DocStatus.DELETE_HELD)) == [held]
    assert view.held("agence-lyon", "bat-12") == [held]
    assert view.held("agence-lyon", "bat-13") == []
    assert [r.key.document_id for r in view.with_status(DocStatus.PUBLISHED)] == ["d1", "d2"]
    view.apply(dataclasses.replace(intent, status=DocStatus.PUBLISHED, remote_id="r-8"))
    assert list(view.uploading()) == []


def test_iterating_a_building_while_applying_is_safe() -> None:
    view = view_of(record("d1"), record("d2"))
    for found in view.documents("agence-lyon", "bat-12"):
        view.apply(Tombstone(found.key))
    assert view.size == 0


document_records = st.builds(
    DocumentRecord,
    key=st.builds(DocKey, identifiers(), identifiers(), document_ids()),
    status=st.sampled_from([s for s in DocStatus if s is not DocStatus.PARKED]),
    sha256=st.binary(min_size=32, max_size=32).map(bytes.hex),
    module=st.sampled_from(list(Module)),
    seen_at=st.datetimes(
        min_value=dt.datetime(1900, 1, 1),
        max_value=dt.datetime(2200, 1, 1),
        timezones=st.just(dt.UTC),
    ),
    document_date=st.dates(),
    size_bytes=st.integers(min_value=0, max_value=2**70),
    remote_id=st.none() | st.text(max_size=30),
    condominium_id=st.none() | st.text(min_size=1, max_size=10),
    held_by=st.none() | st.uuids().map(str),
)


@settings(max_examples=100)
@given(stored=document_records)
def test_compact_storage_gives_back_every_field(stored: DocumentRecord) -> None:
    assert view_of(stored).document(stored.key) == stored


def test_a_document_costs_well_under_300_bytes() -> None:
    count = 20_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        view = PublishedView()
        for i in range(count):  # each record is dropped once applied: only the view keeps memory
            view.apply(
                record(
                    f"{i:08x}-5f2c-4d1e-9a7b-{i:012x}:att-{i % 3}",
                    building=f"bat-{i % 50}",
                    sha256=hashlib.sha256(i.to_bytes(4, "big")).hexdigest(),
                    remote_id=str(1_000_000 + i),
                    seen_at=T0 + dt.timedelta(seconds=i),
                )
            )
        per_document = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
    assert view.size == count
    assert per_document < 300


@settings(max_examples=150)
@given(
    records=st.lists(
        document_records.filter(lambda r: r.size_bytes < 2**63),  # what JSON can carry
        min_size=1,
        max_size=6,
    ),
    drop=st.booleans(),
)
def test_restoring_from_bytes_gives_the_same_view_as_applying_records(
    records: list[DocumentRecord], drop: bool
) -> None:
    applied, restored = PublishedView(), PublishedView()
    changelog: list[StateRecord] = [*records, Tombstone(records[0].key)] if drop else [*records]
    for entry in changelog:
        applied.apply(entry)
        restored.apply_encoded(*encode_state(entry))
    assert restored.counts() == applied.counts()
    for entry in records:
        assert restored.document(entry.key) == applied.document(entry.key)
    for status in DocStatus:
        assert sorted(r.key.encode() for r in restored.with_status(status)) == sorted(
            r.key.encode() for r in applied.with_status(status)
        )
