"""Decoding a raw record gives an event, or poison that says precisely what is wrong with it."""

from __future__ import annotations

import copy
import datetime as dt
import json
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.core.decoding import Poison, PoisonReason, claimed_snapshot, decode_record
from consumer.core.events import DocumentCreated, Event, ManifestSnapshot, as_json
from tests.strategies import (
    JsonObject,
    document_created_dicts,
    document_dicts,
    event_dicts,
    manifest_snapshot_dicts,
)

LIMIT = 64 * 1024

DOCUMENT: JsonObject = {
    "id": "evt-0042:att-1",
    "module": "ag",
    "category": "Procès-verbal",
    "title": "PV AG 2024",
    "document_date": "2024-04-30",
    "audience": "building",
    "content": {
        "media_type": "application/pdf",
        "size_bytes": 184320,
        "sha256": "ab" * 32,
        "url": "https://documents.lsc.example/1.pdf",
    },
}
CREATED: JsonObject = {
    "schema_version": 1,
    "event_type": "document-created",
    "event_id": "6f1c1d8e-3a55-4c2e-9a51-0c2f8d2e7b10",
    "occurred_at": "2024-05-06T09:15:02Z",
    "agency_id": "ag-lyon-3",
    "building_id": "bat-0117",
    "document": DOCUMENT,
}
MANIFEST: JsonObject = {
    "schema_version": 1,
    "event_type": "manifest-snapshot",
    "snapshot_id": "0b6a3f5e-8d2c-4f7a-b1e9-3c4d5e6f7a8b",
    "taken_at": "2024-05-06T02:00:00+02:00",
    "agency_id": "ag-lyon-3",
    "building_id": "bat-0117",
    "modules": ["ag", "contrats"],
    "part": 1,
    "parts": 1,
    "item_count": 2,
    "items": [DOCUMENT, {**DOCUMENT, "id": "evt-0043:att-1", "module": "contrats"}],
}
KEY = b"ag-lyon-3:bat-0117"


def changed(body: JsonObject, **fields: Any) -> JsonObject:
    return {**copy.deepcopy(body), **fields}


def headers_for(body: JsonObject) -> list[tuple[str, bytes | None]]:
    return [
        ("event-type", str(body["event_type"]).encode()),
        ("schema-version", str(body["schema_version"]).encode()),
    ]


def decode(
    body: JsonObject | bytes | None,
    *,
    topic_kind: str | None = None,
    key: bytes | None = KEY,
    headers: Sequence[tuple[str, bytes | None]] = (),
    not_after: dt.datetime | None = None,
) -> Event | Poison:
    """Decode a record as read from the topic of its event type (document topic for raw bytes)."""
    if isinstance(body, dict):
        kind = topic_kind or str(body.get("event_type"))
        value: bytes | None = orjson.dumps(body)
    else:
        kind, value = topic_kind or "document-created", body
    return decode_record(
        topic_kind=kind,
        key=key,
        value=value,
        headers=headers,
        max_value_bytes=LIMIT,
        not_after=not_after,
    )


def poison_reason(result: Event | Poison) -> PoisonReason:
    assert isinstance(result, Poison), f"decoded as an event: {result!r}"
    return result.reason


def test_a_valid_document_created_record_decodes_to_its_event() -> None:
    assert decode(CREATED, headers=headers_for(CREATED)) == msgspec.convert(
        CREATED, type=DocumentCreated
    )


def test_a_valid_manifest_part_decodes_to_its_event() -> None:
    assert decode(MANIFEST, headers=headers_for(MANIFEST)) == msgspec.convert(
        MANIFEST, type=ManifestSnapshot
    )


def test_absent_headers_are_tolerated() -> None:
    assert isinstance(decode(CREATED, headers=[]), DocumentCreated)


def test_unrelated_headers_are_ignored() -> None:
    assert isinstance(decode(CREATED, headers=[("traceparent", b"00-ab"), ("x", None)]), Event)


def test_a_tombstone_is_a_null_value() -> None:
    assert poison_reason(decode(None)) is PoisonReason.NULL_VALUE


def test_a_value_over_the_limit_is_oversized_before_anything_else_is_looked_at() -> None:
    assert poison_reason(decode(b"\xff" * (LIMIT + 1))) is PoisonReason.OVERSIZED


def test_a_value_at_the_limit_is_not_oversized() -> None:
    padded = orjson.dumps(CREATED).ljust(LIMIT, b" ")
    assert isinstance(decode(padded), DocumentCreated)


def test_bytes_that_are_not_utf8_are_not_utf8() -> None:
    result = decode(b'{"title": "caf\xe9"}')
    assert poison_reason(result) is PoisonReason.NOT_UTF8
    assert isinstance(result, Poison)
    assert "byte 14" in result.detail


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"{",
        b"{'single': 'quotes'}",
        b"NaN",
        b"\xef\xbb\xbf{}",
        b'"\\ud800"',
        # Not an object at the first character, and not JSON further on: not JSON.
        b"[not json either",
        b"[1, 2",
        b"12x",
        b'"unterminated',
    ],
)
def test_utf8_that_is_not_json_is_not_json(value: bytes) -> None:
    assert poison_reason(decode(value)) is PoisonReason.NOT_JSON


@pytest.mark.parametrize("value", [b"[]", b'"document-created"', b"1", b"null", b"true"])
def test_json_that_is_not_an_object_is_not_an_object(value: bytes) -> None:
    assert poison_reason(decode(value)) is PoisonReason.NOT_AN_OBJECT


@pytest.mark.parametrize("version", [0, 2, 2.0, -1])
def test_another_integer_schema_version_is_an_unknown_schema_version(version: object) -> None:
    # A future version may change anything else, so its other differences are not reported.
    future = changed(CREATED, schema_version=version, event_type="document-published", extra=1)
    assert poison_reason(decode(future, topic_kind="document-created")) is (
        PoisonReason.UNKNOWN_SCHEMA_VERSION
    )


@pytest.mark.parametrize("version", ["1", "2", True, 1.5, None])
def test_a_schema_version_of_another_type_is_a_schema_violation(version: object) -> None:
    assert poison_reason(decode(changed(CREATED, schema_version=version))) is (
        PoisonReason.SCHEMA_VIOLATION
    )


def test_an_event_type_nobody_knows_is_an_unknown_event_type() -> None:
    unknown = changed(CREATED, event_type="invoice-created")
    assert poison_reason(decode(unknown, topic_kind="document-created")) is (
        PoisonReason.UNKNOWN_EVENT_TYPE
    )


@pytest.mark.parametrize(
    ("body", "topic_kind"), [(MANIFEST, "document-created"), (CREATED, "manifest-snapshot")]
)
def test_an_event_on_the_other_topic_is_on_the_wrong_topic(
    body: JsonObject, topic_kind: str
) -> None:
    assert poison_reason(decode(body, topic_kind=topic_kind)) is PoisonReason.WRONG_TOPIC


@pytest.mark.parametrize(
    "headers",
    [
        [("event-type", b"manifest-snapshot")],
        [("schema-version", b"2")],
        [("schema-version", b"1"), ("schema-version", b"01")],
        [("event-type", b"\xff")],
        [("event-type", None)],
    ],
)
def test_headers_that_contradict_the_body_are_a_header_mismatch(
    headers: list[tuple[str, bytes | None]],
) -> None:
    assert poison_reason(decode(CREATED, headers=headers)) is PoisonReason.HEADER_MISMATCH


WITHOUT_EVENT_TYPE = {name: value for name, value in CREATED.items() if name != "event_type"}
STRING_SIZE = {**DOCUMENT, "content": {**DOCUMENT["content"], "size_bytes": "184320"}}


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (changed(CREATED, event_id="evt-42"), "event_id"),
        (changed(CREATED, occurred_at="2024-05-06T09:15:02"), "occurred_at"),
        (changed(CREATED, document={**DOCUMENT, "audience": "tenants"}), "document.audience"),
        (changed(MANIFEST, items=[DOCUMENT, STRING_SIZE]), "items[1].content.size_bytes"),
        (changed(CREATED, unexpected=True), "unexpected"),
        (WITHOUT_EVENT_TYPE, "event_type"),
        # rules the structs check themselves, after msgspec has read the field
        (changed(CREATED, occurred_at="2024-02-30T09:15:02Z"), "occurred_at"),
        (
            changed(CREATED, document={**DOCUMENT, "document_date": "0999-12-31"}),
            "document.document_date",
        ),
        (changed(MANIFEST, modules=["ag", "contrats", "ag"]), "modules"),
        (
            changed(
                MANIFEST,
                items=[
                    DOCUMENT,
                    {**STRING_SIZE, "content": {**DOCUMENT["content"], "size_bytes": 1.5}},
                ],
            ),
            "items[1].content.size_bytes",
        ),
    ],
)
def test_a_schema_violation_names_the_failing_field_path(body: JsonObject, path: str) -> None:
    topic_kind = "manifest-snapshot" if "items" in body else "document-created"
    result = decode(body, topic_kind=topic_kind)
    assert poison_reason(result) is PoisonReason.SCHEMA_VIOLATION
    assert isinstance(result, Poison)
    assert result.detail.startswith(f"{path}: ")


@pytest.mark.parametrize("key", [None, b""])
def test_a_record_without_key_has_its_key_missing(key: bytes | None) -> None:
    assert poison_reason(decode(CREATED, key=key)) is PoisonReason.KEY_MISSING


@pytest.mark.parametrize(
    "key", [b"ag-lyon-3:bat-0118", b"ag-lyon-3", b"ag-lyon-3:bat-0117 ", b"\xff:bat-0117"]
)
def test_a_key_other_than_agency_colon_building_is_a_key_mismatch(key: bytes) -> None:
    assert poison_reason(decode(CREATED, key=key)) is PoisonReason.KEY_MISMATCH


def test_a_part_numbered_beyond_the_part_count_is_out_of_range() -> None:
    assert poison_reason(decode(changed(MANIFEST, part=4, parts=3))) is (
        PoisonReason.PART_OUT_OF_RANGE
    )


@pytest.mark.parametrize(
    ("parts", "item_count"),
    [(1, 3), (1, 1), (2, 1)],
    ids=["single part, fewer items", "single part, more items", "a part with more than all"],
)
def test_items_that_cannot_add_up_to_item_count_are_an_item_count_mismatch(
    parts: int, item_count: int
) -> None:
    manifest = changed(MANIFEST, parts=parts, item_count=item_count)
    assert poison_reason(decode(manifest)) is PoisonReason.ITEM_COUNT_MISMATCH


def test_a_part_of_several_may_hold_fewer_items_than_item_count() -> None:
    assert isinstance(decode(changed(MANIFEST, parts=2, item_count=5)), ManifestSnapshot)


def test_an_item_of_a_module_the_manifest_does_not_cover_is_out_of_scope() -> None:
    manifest = changed(MANIFEST, modules=["ag"])
    assert poison_reason(decode(manifest)) is PoisonReason.ITEM_OUT_OF_SCOPE


def test_a_document_id_listed_twice_is_a_duplicate_item_id() -> None:
    manifest = changed(MANIFEST, items=[DOCUMENT, DOCUMENT])
    assert poison_reason(decode(manifest)) is PoisonReason.DUPLICATE_ITEM_ID


def test_the_body_is_judged_before_the_key() -> None:
    broken = changed(CREATED, occurred_at="yesterday")
    assert poison_reason(decode(broken, key=None)) is PoisonReason.SCHEMA_VIOLATION


def test_the_topic_is_judged_before_the_headers_and_the_schema() -> None:
    broken = changed(MANIFEST, part="one")
    result = decode(broken, topic_kind="document-created", headers=[("event-type", b"x")])
    assert poison_reason(result) is PoisonReason.WRONG_TOPIC


def test_an_unknown_topic_kind_is_a_wiring_mistake() -> None:
    with pytest.raises(ValueError, match="not an event topic kind"):
        decode(CREATED, topic_kind="lsc.document-created.v1")


@given(event_dicts(), st.booleans())
def test_any_valid_event_decodes_to_an_equal_model(event: JsonObject, with_headers: bool) -> None:
    model = DocumentCreated if event["event_type"] == "document-created" else ManifestSnapshot
    key = f"{event['agency_id']}:{event['building_id']}".encode()
    headers = headers_for(event) if with_headers else []
    assert decode(event, key=key, headers=headers) == msgspec.convert(event, type=model)


@given(manifest_snapshot_dicts())
def test_every_part_of_a_valid_snapshot_decodes(parts: list[JsonObject]) -> None:
    for part in parts:
        key = f"{part['agency_id']}:{part['building_id']}".encode()
        assert isinstance(decode(part, key=key), ManifestSnapshot)


@given(document_created_dicts(agency_id="ag-lyon-3", building_id="bat-0117"))
def test_a_decoded_event_dumped_as_json_decodes_to_itself(event: JsonObject) -> None:
    decoded = decode(event)
    assert isinstance(decoded, DocumentCreated)
    assert decode(as_json(decoded)) == decoded


_JSON: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)
_HEADERS = st.lists(
    st.tuples(
        st.sampled_from(["event-type", "schema-version", "other"]),
        st.one_of(st.none(), st.binary(max_size=20), st.sampled_from([b"1", b"document-created"])),
    ),
    max_size=3,
)


@given(
    st.sampled_from(["document-created", "manifest-snapshot"]),
    st.one_of(st.none(), st.binary(max_size=40)),
    st.one_of(st.none(), st.binary(max_size=300)),
    _HEADERS,
)
def test_arbitrary_bytes_never_raise(
    topic_kind: str,
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes | None]],
) -> None:
    result = decode_record(
        topic_kind=topic_kind, key=key, value=value, headers=headers, max_value_bytes=200
    )
    assert isinstance(result, Poison | DocumentCreated | ManifestSnapshot)


@given(
    st.sampled_from(["document-created", "manifest-snapshot"]),
    st.one_of(_JSON, st.dictionaries(st.sampled_from(sorted(MANIFEST)), _JSON)),
    _HEADERS,
)
def test_arbitrary_json_never_raises(
    topic_kind: str, body: Any, headers: list[tuple[str, bytes | None]]
) -> None:
    result = decode_record(
        topic_kind=topic_kind,
        key=KEY,
        value=orjson.dumps(body),
        headers=headers,
        max_value_bytes=LIMIT,
    )
    assert isinstance(result, Poison | DocumentCreated | ManifestSnapshot)


@given(st.lists(document_dicts(), min_size=1, max_size=3), st.data())
def test_arbitrary_manifest_numbers_never_raise(
    items: list[JsonObject], data: st.DataObject
) -> None:
    numbers = st.integers(min_value=0, max_value=12)
    manifest = changed(
        MANIFEST,
        modules=sorted({str(item["module"]) for item in items}),
        part=data.draw(numbers),
        parts=data.draw(numbers),
        item_count=data.draw(numbers),
        items=items,
    )
    assert isinstance(decode(manifest), Poison | ManifestSnapshot)


EXAMPLES = Path(__file__).resolve().parents[2] / "schemas" / "examples"
BAD_URL_EXAMPLES = sorted(
    path
    for path in EXAMPLES.glob("*/invalid/*.json")
    if path.stem.startswith(("url-", "item-url-")) and path.stem != "url-null"
)


def with_url(body: JsonObject, url: str) -> JsonObject:
    document = copy.deepcopy(DOCUMENT)
    document["content"]["url"] = url
    if body["event_type"] == "document-created":
        return changed(body, document=document)
    return changed(body, items=[document, body["items"][1]])


def test_every_url_example_the_contract_refuses_is_a_bad_url() -> None:
    assert len(BAD_URL_EXAMPLES) >= 20
    for path in BAD_URL_EXAMPLES:
        body = json.loads(path.read_text(encoding="utf-8"))
        if body["event_type"] == "document-created":
            url = body["document"]["content"]["url"]
        else:
            url = body["items"][0]["content"]["url"]
        for event in (CREATED, MANIFEST):
            result = decode(with_url(event, url))
            assert poison_reason(result) is PoisonReason.BAD_URL, (path.name, event["event_type"])


def test_a_bad_url_names_the_item_and_hides_user_info() -> None:
    result = decode(with_url(MANIFEST, "https://relay:secret@documents.lsc.example/1.pdf"))
    assert isinstance(result, Poison)
    assert result.reason is PoisonReason.BAD_URL
    assert result.detail.startswith("items[0].content.url: 'https://***@documents.lsc.example")
    assert "secret" not in result.detail


def test_a_bad_url_beside_another_violation_is_a_schema_violation() -> None:
    broken = with_url(CREATED, "https://documents.lsc.example:70000/1.pdf")
    broken["document"]["title"] = ""
    result = decode(broken)
    assert poison_reason(result) is PoisonReason.SCHEMA_VIOLATION
    assert isinstance(result, Poison)
    assert "String should match pattern" not in result.detail  # the pattern is not quoted


def empty_items_manifest(count: int) -> bytes:
    """A manifest part whose ``count`` items are all ``{}``, padded to 10 bytes an item."""
    header = orjson.dumps(changed(MANIFEST, item_count=count, items=[]))
    return header.removesuffix(b"[]}") + b"[" + b",".join([b"{}       "] * count) + b"]}"


def test_a_manifest_of_100000_empty_items_is_refused_at_little_more_than_its_size() -> None:
    value = empty_items_manifest(100_000)
    assert len(value) > 1_000_000
    tracemalloc.start()
    try:
        result = decode_record(
            topic_kind="manifest-snapshot",
            key=KEY,
            value=value,
            headers=headers_for(MANIFEST),
            max_value_bytes=len(value),
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert poison_reason(result) is PoisonReason.SCHEMA_VIOLATION
    assert peak <= 3 * len(value)
    # The first violation is named; the 699,999 others (seven fields in every item) are not read.
    assert isinstance(result, Poison)
    assert result.detail == "items[0].id: required but missing"


def test_a_refused_record_names_a_bounded_detail_however_long_what_it_quotes() -> None:
    long_name = "x" * 60_000
    result = decode(changed(CREATED, **{long_name: 1}))
    assert poison_reason(result) is PoisonReason.SCHEMA_VIOLATION
    assert isinstance(result, Poison)
    assert result.detail.startswith("xxx")
    assert len(result.detail) < 500


NOW = dt.datetime(2024, 5, 6, 9, 15, 2, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (changed(CREATED, occurred_at="2024-05-06T09:20:03Z"), PoisonReason.OCCURRED_AT_IN_FUTURE),
        (changed(MANIFEST, taken_at="2024-05-06T11:20:03+02:00"), PoisonReason.TAKEN_AT_IN_FUTURE),
    ],
)
def test_an_event_dated_after_the_bound_is_from_the_future(
    body: JsonObject, reason: PoisonReason
) -> None:
    result = decode(body, not_after=NOW + dt.timedelta(minutes=5))
    assert poison_reason(result) is reason
    assert isinstance(result, Poison)
    assert "clock skew" in result.detail


@pytest.mark.parametrize(
    "body",
    [
        changed(CREATED, occurred_at="2024-05-06T09:20:02Z"),
        changed(MANIFEST, taken_at="2024-05-06T11:20:02+02:00"),
        changed(MANIFEST, taken_at="1999-01-01T00:00:00Z"),
    ],
)
def test_an_event_dated_at_or_before_the_bound_decodes(body: JsonObject) -> None:
    assert not isinstance(decode(body, not_after=NOW + dt.timedelta(minutes=5)), Poison)


@given(event_dicts(), st.integers(min_value=-(10**6), max_value=10**6))
def test_the_time_bound_refuses_exactly_the_events_after_it(event: JsonObject, shift: int) -> None:
    key = f"{event['agency_id']}:{event['building_id']}".encode()
    decoded = decode(event, key=key)
    assert not isinstance(decoded, Poison)
    moment = decoded.occurred_at if isinstance(decoded, DocumentCreated) else decoded.taken_at
    bound = moment + dt.timedelta(microseconds=shift)
    result = decode(event, key=key, not_after=bound)
    assert isinstance(result, Poison) == (shift < 0)


@pytest.mark.parametrize(
    ("key", "value", "claimed"),
    [
        (KEY, orjson.dumps(MANIFEST), ("ag-lyon-3", "bat-0117", MANIFEST["snapshot_id"])),
        (b"ag-lyon-3:bat-9", orjson.dumps(MANIFEST), None),  # the key speaks for another building
        (None, orjson.dumps(MANIFEST), None),
        (KEY, b'{"snapshot_id": ', None),
        (KEY, orjson.dumps(CREATED), None),
        (KEY, orjson.dumps(changed(MANIFEST, snapshot_id=12)), None),
        (KEY, None, None),
    ],
)
def test_a_poison_part_names_its_snapshot_only_when_its_key_agrees(
    key: bytes | None, value: bytes | None, claimed: tuple[str, str, str] | None
) -> None:
    assert claimed_snapshot(key, value) == claimed
