"""State records: the changelog format the relay restores its view from after a restart."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource

from consumer.core.events import Document, Module
from consumer.core.state import (
    HELD,
    AgencyKey,
    AgencyRecord,
    BuildingKey,
    BuildingRecord,
    DocKey,
    DocStatus,
    DocumentRecord,
    HeldManifest,
    HoldDecision,
    StateDecodeError,
    StateRecord,
    Tombstone,
    decode_key,
)
from consumer.core.state_codec import decode_state, encode_state
from consumer.core.state_compact import COMPACT_FORM
from consumer.core.view import PublishedView
from tests.changelog_forms import first_form
from tests.strategies import document_dicts, document_ids, identifiers

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
PARIS = dt.timezone(dt.timedelta(hours=2))
KEY = DocKey("agence-lyon", "bat-12", "evt-1:att-1")


def _validator(name: str) -> Draft202012Validator:
    schemas = [json.loads(p.read_text(encoding="utf-8")) for p in SCHEMAS.glob("*.schema.json")]
    registry: Registry[Any] = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in schemas
    )
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))
    return Draft202012Validator(schema, registry=registry, format_checker=FormatChecker())


VALIDATOR = _validator("state-record.v1")
COMPACT_VALIDATOR = _validator("state-record.v2")
COMPACT_EXAMPLES = SCHEMAS / "examples" / "state-record.v2"


def published(**changes: Any) -> DocumentRecord:
    fields: dict[str, Any] = {
        "key": KEY,
        "status": DocStatus.PUBLISHED,
        "sha256": hashlib.sha256(b"v1").hexdigest(),
        "module": Module.AG,
        "seen_at": dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC),
        "document_date": dt.date(2024, 5, 1),
        "size_bytes": 52_000,
        "remote_id": "doc-991",
        "condominium_id": "8841",
    }
    return DocumentRecord(**(fields | changes))


def a_document(data: dict[str, Any] | None = None) -> Document:
    return msgspec.convert(
        data
        or {
            "id": KEY.document_id,
            "module": "ag",
            "category": "PV",
            "title": "AG 2024",
            "document_date": "2024-05-01",
            "audience": "building",
            "content": {
                "media_type": "application/pdf",
                "size_bytes": 52_000,
                "sha256": hashlib.sha256(b"v1").hexdigest(),
                "url": "https://documents.lsc.example/1.pdf",
            },
        },
        type=Document,
    )


def validate(value: bytes) -> None:
    """Check a changelog value against the schema of its form."""
    if value[0] == COMPACT_FORM:
        COMPACT_VALIDATOR.validate(value.hex())
    else:
        VALIDATOR.validate(orjson.loads(value))


def round_trip(record: StateRecord) -> StateRecord:
    key, value = encode_state(record)
    if value is not None:
        validate(value)
    return decode_state(key, value)


RECORDS = [
    published(),
    published(status=DocStatus.BASELINE, remote_id=None, condominium_id=None),
    published(status=DocStatus.UPLOADING, remote_id=None),
    published(status=DocStatus.DELETE_HELD, held_by="3f2c1b7e-0000-4000-8000-000000000001"),
    published(
        status=DocStatus.PARKED,
        remote_id=None,
        condominium_id=None,
        parked_reason="unmapped_building",
        document=a_document(),
    ),
    BuildingRecord(
        "agence-lyon",
        "bat-12",
        {Module.AG: dt.datetime(2024, 5, 6, tzinfo=dt.UTC)},
        first_publication_done=True,
    ),
    BuildingRecord("agence-lyon", "bat-13"),
    BuildingRecord(
        "agence-lyon",
        "bat-14",
        held=HeldManifest(
            "3f2c1b7e-0000-4000-8000-000000000002",
            dt.datetime(2024, 5, 6, tzinfo=dt.UTC),
            frozenset({Module.AG, Module.CONTRATS}),
            HoldDecision.DISCARD,
        ),
    ),
    published(
        status=DocStatus.UPLOAD_HELD,
        held_by="3f2c1b7e-0000-4000-8000-000000000002",
        document=a_document(),
    ),
    Tombstone(KEY),
    Tombstone(BuildingKey("agence-lyon", "bat-12")),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_every_record_kind_survives_the_changelog(record: StateRecord) -> None:
    assert round_trip(record) == record


def test_a_building_record_written_before_held_manifests_were_kept_is_read() -> None:
    value = orjson.dumps(
        {
            "schema_version": 1,
            "kind": "building",
            "manifest_taken_at": {"ag": "2024-05-06T00:00:00Z"},
            "first_publication_done": True,
        }
    )
    validate(value)
    assert decode_state(b"agence-lyon:bat-12", value) == BuildingRecord(
        "agence-lyon", "bat-12", {Module.AG: dt.datetime(2024, 5, 6, tzinfo=dt.UTC)}, True
    )


def test_keys_are_agency_building_document_and_document_ids_may_hold_colons() -> None:
    key, value = encode_state(Tombstone(KEY))
    assert (key, value) == (b"agence-lyon:bat-12:evt-1:att-1", None)
    assert decode_key(key) == KEY
    assert decode_key(b"agence-lyon:bat-12") == BuildingKey("agence-lyon", "bat-12")


def test_json_values_carry_version_and_kind_and_times_in_utc() -> None:
    record = published(
        seen_at=dt.datetime(2024, 5, 6, 9, 8, 9, tzinfo=PARIS),
        status=DocStatus.PARKED,
        parked_reason="unmapped_building",
        document=a_document(),
    )
    value = orjson.loads(encode_state(record)[1] or b"")
    assert (value["schema_version"], value["kind"]) == (1, "document")
    assert value["seen_at"] == "2024-05-06T07:08:09Z"
    restored = round_trip(record)
    assert isinstance(restored, DocumentRecord)
    assert restored.seen_at == record.seen_at  # the same instant
    assert restored.seen_at.tzinfo == dt.UTC


def test_document_records_without_a_full_document_are_written_compact() -> None:
    record = published(seen_at=dt.datetime(2024, 5, 6, 9, 8, 9, tzinfo=PARIS))
    value = encode_state(record)[1] or b""
    assert value[0] == COMPACT_FORM
    assert len(value) < len(first_form(record)) / 4
    restored = round_trip(record)
    assert isinstance(restored, DocumentRecord)
    assert restored.seen_at == record.seen_at
    assert restored.seen_at.tzinfo == dt.UTC


@pytest.mark.parametrize(
    "record",
    [r for r in RECORDS if isinstance(r, DocumentRecord)],
    ids=lambda r: str(r.status),
)
def test_document_records_of_the_first_form_are_still_read(record: DocumentRecord) -> None:
    # A compacted topic is never rewritten: records written before the compact form stay.
    VALIDATOR.validate(orjson.loads(first_form(record)))
    assert decode_state(record.key.encode(), first_form(record)) == record


@pytest.mark.parametrize(
    "record",
    [
        published(remote_id=""),
        published(condominium_id="a\0b"),
        published(held_by=""),
        published(sha256="AB" * 32),
    ],
    ids=["empty remote id", "NUL in an id", "empty held_by", "upper-case sha256"],
)
def test_records_the_compact_form_cannot_carry_keep_the_json_form(record: DocumentRecord) -> None:
    value = encode_state(record)[1] or b""
    assert value.startswith(b"{")


def _example(path: Path) -> str:
    text = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(text, str)
    return text


@pytest.mark.parametrize(
    "path", sorted((COMPACT_EXAMPLES / "valid").glob("*.json")), ids=lambda p: p.stem
)
def test_valid_compact_examples_are_read_and_written_back_byte_for_byte(path: Path) -> None:
    value = bytes.fromhex(_example(path))
    record = decode_state(KEY.encode(), value)
    assert isinstance(record, DocumentRecord)
    assert encode_state(record) == (KEY.encode(), value)


def _invalid_compact_values() -> list[Any]:
    """Invalid examples that are the hex of some bytes (the others only the schema can judge)."""
    paths = sorted((COMPACT_EXAMPLES / "invalid").glob("*.json"))
    texts = {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in paths}
    return [
        pytest.param(bytes.fromhex(text), id=name)
        for name, text in texts.items()
        if isinstance(text, str) and re.fullmatch("(?:[0-9a-f]{2})+", text)
    ]


@pytest.mark.parametrize("value", _invalid_compact_values())
def test_invalid_compact_examples_are_refused(value: bytes) -> None:
    with pytest.raises(StateDecodeError):
        decode_state(KEY.encode(), value)


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        (b"agence-lyon", b"{}", "not agency:building"),
        (b"agence-lyon::doc", None, "not agency:building"),
        (b"\xff:b:c", None, "not UTF-8"),
        (KEY.encode(), b"{not json", "not JSON"),
        (KEY.encode(), b"[]", "not a JSON object"),
        (KEY.encode(), b'{"schema_version": 2, "kind": "document"}', "reads version 1 only"),
        (KEY.encode(), b'{"schema_version": 1, "kind": "document"}', "malformed"),
    ],
)
def test_records_the_relay_cannot_trust_are_refused(
    key: bytes, value: bytes | None, problem: str
) -> None:
    with pytest.raises(StateDecodeError, match=problem):
        decode_state(key, value)


def test_a_document_record_under_a_building_key_is_refused() -> None:
    _, value = encode_state(published())
    with pytest.raises(StateDecodeError, match="does not fit a BuildingKey"):
        decode_state(b"agence-lyon:bat-12", value)


@st.composite
def document_records(draw: st.DrawFn) -> DocumentRecord:
    """Any document record, with the fields its status calls for."""
    document = a_document(draw(document_dicts()))
    status = draw(st.sampled_from(list(DocStatus)))
    return DocumentRecord(
        key=DocKey(draw(identifiers()), draw(identifiers()), draw(document_ids())),
        status=status,
        sha256=document.content.sha256,
        module=document.module,
        seen_at=draw(
            st.datetimes(
                min_value=dt.datetime(1990, 1, 1),
                max_value=dt.datetime(2099, 1, 1),
                timezones=st.just(dt.UTC),
            )
        ),
        document_date=document.document_date,
        size_bytes=document.content.size_bytes,
        remote_id=None if status is DocStatus.BASELINE else "r-1",
        condominium_id="8841",
        held_by="snap" if status in HELD else None,
        parked_reason="unmapped_building" if status is DocStatus.PARKED else None,
        document=document if status in (DocStatus.PARKED, DocStatus.UPLOAD_HELD) else None,
    )


@settings(max_examples=60)
@given(record=document_records())
def test_any_document_record_round_trips_and_matches_the_schema(record: DocumentRecord) -> None:
    assert round_trip(record) == record


def test_agency_controls_round_trip_match_the_schema_and_reach_the_view() -> None:
    paused = AgencyRecord(
        "agence-lyon",
        paused=True,
        changed_by="cli:ops@host",
        changed_at=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        approved_plan="a1b2c3",
        approved_modules=frozenset({Module.AG, Module.CONTRATS}),
    )
    key, _ = encode_state(paused)

    assert key == b"agence-lyon:~agency"  # no building id starts with "~"
    assert decode_key(key) == AgencyKey("agence-lyon")
    assert round_trip(paused) == paused
    assert round_trip(AgencyRecord("agence-lyon")) == AgencyRecord("agence-lyon")
    view = PublishedView()
    view.apply_encoded(*encode_state(paused))
    assert view.paused_agencies() == {"agence-lyon"}
    view.apply(AgencyRecord("agence-lyon", paused=False))
    assert view.paused_agencies() == set()
    view.apply(Tombstone(AgencyKey("agence-lyon")))
    assert view.agency("agence-lyon") is None


def test_a_backfill_only_pause_round_trips_and_an_older_agency_record_reads_as_not_paused() -> None:
    backfill_paused = AgencyRecord("agence-lyon", backfill_paused=True, changed_by="cli:ops@host")
    assert round_trip(backfill_paused) == backfill_paused
    view = PublishedView()
    view.apply_encoded(*encode_state(backfill_paused))
    assert (view.paused_agencies(), view.backfill_paused_agencies()) == (set(), {"agence-lyon"})

    key, value = encode_state(AgencyRecord("agence-lyon", paused=True))
    assert value is not None
    older = orjson.loads(value)
    del older["backfill_paused"]  # written before a pause had a scope
    validate(orjson.dumps(older))
    assert decode_state(key, orjson.dumps(older)) == AgencyRecord("agence-lyon", paused=True)
