"""The published view: changed only by state records, compact, and answering what planning asks."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import tracemalloc
from collections.abc import Iterable
from typing import Any, NamedTuple

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.core.events import Document, Module
from consumer.core.state import (
    BuildingKey,
    BuildingRecord,
    DocKey,
    DocStatus,
    DocumentRecord,
    StateDecodeError,
    StateRecord,
    Tombstone,
)
from consumer.core.state_codec import decode_state, encode_state
from consumer.core.state_compact import compact_document
from consumer.core.view import PublishedView
from tests.changelog_forms import encode_first_form
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
        DocStatus.UPLOAD_HELD: 0,
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


def test_on_partner_by_agency_counts_every_building_of_an_agency_and_follows_changes() -> None:
    other = DocKey("agence-nice", "bat-1", "n1")
    view = view_of(
        record("d1"),
        record("d2", status=DocStatus.DELETE_HELD, held_by="snap-1"),
        record("d3", status=DocStatus.UPLOADING, remote_id=None),
        record("d4", building="bat-13"),
        record("n1", key=other),
    )
    assert view.on_partner_by_agency() == {"agence-lyon": 3, "agence-nice": 1}
    view.apply(record("d3"))  # the upload went through
    view.apply(Tombstone(other))
    assert view.on_partner_by_agency() == {"agence-lyon": 4}


def test_documents_of_a_building_and_work_that_needs_attention() -> None:
    document = msgspec.convert(
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
        },
        type=Document,
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


class Read(NamedTuple):
    """A changelog record as a consumer hands it out."""

    key: bytes
    value: bytes | None


@st.composite
def changelogs(draw: st.DrawFn) -> list[StateRecord]:
    """Records of a few documents in a few buildings: replacements, tombstones, every status."""
    places = [
        BuildingKey("agence-a", "bat-1"),
        BuildingKey("agence-a", "bat-2"),
        BuildingKey("agence-b", "bat-1"),
    ]
    keys = st.builds(
        lambda place, document_id: DocKey(place.agency_id, place.building_id, document_id),
        st.sampled_from(places),
        st.sampled_from(["d1", "d2:att-1", "d3"]),
    )
    documents = st.builds(
        lambda stored, key, status: dataclasses.replace(
            stored,
            key=key,
            status=status,
            parked_reason="unmapped_building" if status is DocStatus.PARKED else None,
        ),
        document_records.filter(lambda r: r.size_bytes < 2**64),  # what JSON can carry
        keys,
        st.sampled_from(list(DocStatus)),
    )
    buildings = st.builds(
        lambda place, modules: BuildingRecord(
            place.agency_id, place.building_id, dict.fromkeys(modules, T0), True
        ),
        st.sampled_from(places),
        st.sets(st.sampled_from(list(Module)), max_size=2),
    )
    tombstones = st.builds(Tombstone, keys | st.sampled_from(places))
    entries: list[StateRecord] = draw(
        st.lists(st.one_of(documents, documents, buildings, tombstones), min_size=1, max_size=12)
    )
    return entries


def _by_key(records: Iterable[DocumentRecord]) -> list[DocumentRecord]:
    return sorted(records, key=lambda r: r.key.encode())


def assert_same_view(found: PublishedView, expected: PublishedView) -> None:
    assert found.counts() == expected.counts()
    places = sorted(expected.buildings(), key=lambda b: b.encode())
    assert sorted(found.buildings(), key=lambda b: b.encode()) == places
    for place in places:
        agency_id, building_id = place.agency_id, place.building_id
        assert found.building(agency_id, building_id) == expected.building(agency_id, building_id)
        documents = _by_key(expected.documents(agency_id, building_id))
        assert _by_key(found.documents(agency_id, building_id)) == documents
        for document in documents:
            assert found.brief(document.key) == expected.brief(document.key)
        for module in Module:
            assert found.published_count(agency_id, building_id, [module]) == (
                expected.published_count(agency_id, building_id, [module])
            )
    for status in DocStatus:
        assert _by_key(found.with_status(status)) == _by_key(expected.with_status(status))


@settings(max_examples=300)
@given(changelog=changelogs(), batch=st.integers(min_value=1, max_value=5))
def test_restoring_either_form_gives_the_view_of_decoding_and_applying(
    changelog: list[StateRecord], batch: int
) -> None:
    applied = view_of(*changelog)
    for encode in (encode_state, encode_first_form):  # the compact form, and the JSON it replaced
        encoded = [Read(*encode(entry)) for entry in changelog]
        slow, one_by_one, in_batches = PublishedView(), PublishedView(), PublishedView()
        for key, value in encoded:
            slow.apply(decode_state(key, value))
            one_by_one.apply_encoded(key, value)
        for start in range(0, len(encoded), batch):
            assert in_batches.restore(encoded[start : start + batch]) == len(
                encoded[start : start + batch]
            )
        assert_same_view(slow, applied)
        assert_same_view(one_by_one, slow)
        assert_same_view(in_batches, slow)


@settings(max_examples=300)
@given(
    stored=document_records.filter(lambda r: compact_document(r) is not None),
    damage=st.one_of(
        st.tuples(st.just("set"), st.integers(min_value=0), st.integers(0, 255), st.integers(1, 8)),
        st.tuples(st.just("cut"), st.integers(min_value=0), st.just(0), st.just(0)),
        st.tuples(st.just("add"), st.integers(min_value=0), st.integers(0, 255), st.just(1)),
    ),
)
def test_a_damaged_compact_record_is_refused_exactly_when_decoding_refuses_it(
    stored: DocumentRecord, damage: tuple[str, int, int, int]
) -> None:
    key, value = encode_state(stored)
    assert value is not None
    action, at, byte, length = damage
    at %= len(value)
    if action == "set":
        value = value[:at] + bytes([byte]) * length + value[at + length :]
    elif action == "cut":
        value = value[:at]
    else:
        value = value + bytes([byte])
    assert_restored_as_decoded(key, value)


def assert_restored_as_decoded(key: bytes, value: bytes) -> None:
    restored = PublishedView()
    try:
        decoded = decode_state(key, value)
    except StateDecodeError:
        with pytest.raises(StateDecodeError):
            restored.restore([Read(key, value)])
        return
    restored.restore([Read(key, value)])
    assert_same_view(restored, view_of(decoded))


@pytest.mark.parametrize(
    "stored",
    [
        record(),
        record(status=DocStatus.BASELINE, remote_id=None, condominium_id=None, size_bytes=0),
        record(status=DocStatus.FILTERED, condominium_id="résidence", module=Module.GED),
    ],
    ids=["published", "baseline", "filtered"],
)
def test_every_run_of_edge_bytes_in_a_compact_record_is_judged_as_decoding_judges_it(
    stored: DocumentRecord,
) -> None:
    key, value = encode_state(stored)
    assert value is not None
    edges = (0x00, 0x01, 0x02, 0x04, 0x05, 0x07, 0x08, 0x41, 0x7F, 0x80, 0xC3, 0xFF)
    for byte in edges:
        assert_restored_as_decoded(key, value + bytes([byte]))
    for at in range(len(value)):
        assert_restored_as_decoded(key, value[:at])
        for byte in edges:
            for length in (1, 2, 3, 4, 8):
                damaged = value[:at] + bytes([byte]) * length + value[at + length :]
                assert_restored_as_decoded(key, damaged)


def test_restore_counts_what_it_applied_before_a_record_it_refuses() -> None:
    good = [Read(*encode_state(record(f"d{n}"))) for n in range(3)]
    view = PublishedView()
    with pytest.raises(StateDecodeError):
        view.restore([*good, Read(b"agence-lyon:bat-12:bad", b"\x02 too short")])
    assert view.count(DocStatus.PUBLISHED) == 3
    assert view.published_count("agence-lyon", "bat-12", [Module.AG]) == 3
