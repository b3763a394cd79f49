"""A dead letter keeps the original record byte for byte, says why, and follows its schema."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource

from consumer.core.deadletter import (
    DEAD_LETTER_REASONS,
    MAX_DETAIL_CHARS,
    REASON_HEADER,
    DeadLetterLedger,
    ProcessingReason,
    build_dead_letter,
    dead_letter_source,
)
from consumer.core.decoding import PoisonReason

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
FAILED_AT = dt.datetime(2024, 5, 6, 11, 15, 3, 512_000, tzinfo=dt.timezone(dt.timedelta(hours=2)))


def _dead_letter_validator() -> Draft202012Validator:
    schemas = [json.loads(path.read_text("utf-8")) for path in SCHEMAS.glob("*.schema.json")]
    registry: Registry[Any] = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in schemas
    )
    schema = next(schema for schema in schemas if schema["$id"].endswith(":dead-letter.v1"))
    return Draft202012Validator(schema, registry=registry, format_checker=FormatChecker())


VALIDATOR = _dead_letter_validator()


def dead_letter(
    *,
    key: bytes | None = b"ag-lyon-3:bat-0117",
    value: bytes | None = b'{"schema_version": 2}',
    headers: list[tuple[str, bytes | None]] | None = None,
    reason: str = PoisonReason.UNKNOWN_SCHEMA_VERSION,
    detail: str = "schema_version 2 is not one this relay reads (1)",
    timestamp_ms: int | None = 1_714_986_902_000,
) -> tuple[bytes | None, bytes, list[tuple[str, bytes | None]]]:
    return build_dead_letter(
        source_topic="lsc.document-created.v1",
        partition=3,
        offset=418_227,
        timestamp_ms=timestamp_ms,
        key=key,
        value=value,
        headers=[("event-type", b"document-created")] if headers is None else headers,
        reason=reason,
        detail=detail,
        failed_at=FAILED_AT,
        relay_version="0.1.0",
    )


def envelope_of(value: bytes) -> dict[str, Any]:
    envelope: dict[str, Any] = orjson.loads(value)
    VALIDATOR.validate(envelope)
    return envelope


def unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text, validate=True)


def test_the_envelope_says_where_the_record_came_from_why_and_when() -> None:
    _, value, _ = dead_letter()
    envelope = envelope_of(value)
    assert envelope["schema_version"] == 1
    assert envelope["reason"] == "unknown_schema_version"
    assert envelope["detail"] == "schema_version 2 is not one this relay reads (1)"
    assert envelope["failed_at"] == "2024-05-06T09:15:03.512Z"
    assert envelope["relay_version"] == "0.1.0"
    assert envelope["source"] == {
        "topic": "lsc.document-created.v1",
        "partition": 3,
        "offset": 418_227,
        "timestamp_ms": 1_714_986_902_000,
    }


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (b"ag-lyon-3:bat-0117", b'{"title": "caf\xc3\xa9"}'),
        (b"\xff\xfe", b"\x00\x01\xfe\xff"),
        (None, None),
        (b"", b""),
    ],
    ids=["utf8", "not utf8", "null key and value", "empty key and value"],
)
def test_the_envelope_keeps_the_original_key_and_value_byte_for_byte(
    key: bytes | None, value: bytes | None
) -> None:
    out_key, out_value, _ = dead_letter(key=key, value=value)
    record = envelope_of(out_value)["record"]
    assert (unb64(record["key_base64"]), unb64(record["value_base64"])) == (key, value)
    assert out_key == key


def test_headers_are_kept_in_order_with_duplicates_and_null_values() -> None:
    original = [("b", b"\xff"), ("a", b"1"), ("a", b"2"), ("trace", None)]
    _, value, headers = dead_letter(headers=original)
    kept = [
        (header["key"], unb64(header["value_base64"]))
        for header in envelope_of(value)["record"]["headers"]
    ]
    assert kept == original
    assert headers == [(REASON_HEADER, b"unknown_schema_version"), *original]


def test_a_record_without_timestamp_gets_a_null_one() -> None:
    _, value, _ = dead_letter(timestamp_ms=-1)
    assert envelope_of(value)["source"]["timestamp_ms"] is None


def test_a_long_detail_is_cut_to_the_schema_limit() -> None:
    _, value, _ = dead_letter(detail="x" * (MAX_DETAIL_CHARS + 1))
    assert len(envelope_of(value)["detail"]) == MAX_DETAIL_CHARS


@pytest.mark.parametrize("reason", sorted(DEAD_LETTER_REASONS))
def test_every_reason_the_relay_can_give_is_one_the_schema_allows(reason: str) -> None:
    _, value, _ = dead_letter(reason=reason)
    assert envelope_of(value)["reason"] == reason


def test_the_schema_allows_no_reason_the_relay_cannot_give() -> None:
    schema = json.loads((SCHEMAS / "dead-letter.v1.schema.json").read_text("utf-8"))
    enum = schema["properties"]["reason"]["enum"]
    assert set(enum) == {*PoisonReason, *ProcessingReason}


def test_an_unknown_reason_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="not a dead-letter reason"):
        dead_letter(reason="it_broke")


def test_a_naive_failure_time_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        build_dead_letter(
            source_topic="t",
            partition=0,
            offset=0,
            timestamp_ms=None,
            key=None,
            value=None,
            headers=[],
            reason=PoisonReason.NULL_VALUE,
            detail="",
            failed_at=dt.datetime(2024, 5, 6),
            relay_version="0.1.0",
        )


@given(
    st.one_of(st.none(), st.binary(max_size=64)),
    st.one_of(st.none(), st.binary(max_size=512)),
    st.lists(st.tuples(st.text(max_size=10), st.one_of(st.none(), st.binary(max_size=16)))),
    st.text(max_size=50),
)
def test_any_record_round_trips_through_a_valid_envelope(
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes | None]],
    detail: str,
) -> None:
    _, out_value, out_headers = dead_letter(key=key, value=value, headers=headers, detail=detail)
    record = envelope_of(out_value)["record"]
    assert unb64(record["key_base64"]) == key
    assert unb64(record["value_base64"]) == value
    assert [(h["key"], unb64(h["value_base64"])) for h in record["headers"]] == headers
    assert out_headers[1:] == headers


# --- once per source record ---------------------------------------------------------------------


def test_a_dead_letter_names_its_source_record() -> None:
    _, value, _ = dead_letter()
    assert dead_letter_source(value) == ("lsc.document-created.v1", 3, 418_227)
    for other in (None, b"{not json", b"[]", b'{"source": {"topic": "t", "partition": "4"}}'):
        assert dead_letter_source(other) is None


def test_the_ledger_reads_each_stretch_of_the_topic_once() -> None:
    ledger = DeadLetterLedger()
    source = ("lsc.document-created.v1", 4, 1_234)
    assert not ledger.reaches_back_to(1_000)
    # The first look reads from the records dated since its bound to the end of each partition.
    assert ledger.unread({0: 5, 1: 7}, {0: 9, 1: 7}) == [(0, 5, 9), (1, 7, 7)]
    ledger.mark_read(0, 5, 9, [source])
    ledger.mark_read(1, 7, 7, [])
    ledger.reached_back_to(1_000)
    assert source in ledger
    assert ("lsc.document-created.v1", 4, 1_235) not in ledger
    # A later record reaches back no further: only what was written since is read.
    assert ledger.reaches_back_to(2_000)
    assert ledger.unread(None, {0: 12, 1: 8}) == [(0, 9, 12), (1, 7, 8)]
    # A partition added to the topic since is read from its beginning.
    assert ledger.unread(None, {2: 3}) == [(2, 0, 3)]
    # An older record reaches further back: the stretch before what was read, and the tail.
    assert not ledger.reaches_back_to(500)
    assert ledger.unread({0: 2, 1: 7}, {0: 12, 1: 7}) == [(0, 2, 5), (0, 9, 12)]
    ledger.mark_read(0, 2, 5, [])
    ledger.mark_read(0, 9, 12, [])
    ledger.reached_back_to(500)
    assert ledger.unread({0: 2, 1: 7}, {0: 12, 1: 7}) == []
    assert source in ledger
    # A record without a timestamp reaches back to the beginning, once.
    assert not ledger.reaches_back_to(None)
    ledger.reached_back_to(None)
    assert ledger.reaches_back_to(None)


def test_a_dead_letter_written_is_known_without_reading_it_back() -> None:
    ledger = DeadLetterLedger()
    ledger.note(("lsc.manifest-snapshot.v1", 0, 7))
    ledger.note(None)
    assert ("lsc.manifest-snapshot.v1", 0, 7) in ledger


def test_the_ledger_forgets_all_past_its_bound_and_reads_again() -> None:
    ledger = DeadLetterLedger(max_sources=2)
    ledger.mark_read(0, 0, 3, [("t", 0, 1), ("t", 0, 2), ("t", 0, 3)])
    ledger.reached_back_to(1_000)
    ledger.trim()
    assert ("t", 0, 1) not in ledger
    assert not ledger.reaches_back_to(2_000)
    assert ledger.unread({0: 0}, {0: 3}) == [(0, 0, 3)]
