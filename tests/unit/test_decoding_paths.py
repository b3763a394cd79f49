"""A valid event is decoded in one pass from its bytes; everything else takes the checked path.

The one-pass path may only ever answer what the checked path (orjson, the outside-in checks,
pydantic in python mode) answers: the same event for the same bytes and headers. These tests hold
the two equal on the contract's examples, on generated events, on events broken anywhere and on
bytes a JSON parser may read differently; and they check that valid events do take the fast path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.core import decoding
from consumer.core.decoding import Poison, decode_record
from tests.strategies import JsonObject, event_dicts
from tests.unit.test_contract import _broken

EXAMPLES = Path(__file__).resolve().parents[2] / "schemas" / "examples"
KINDS = {"document-created.v1": "document-created", "manifest-snapshot.v1": "manifest-snapshot"}
MAX_BYTES = 1_000_000
Headers = list[tuple[str, bytes | None]]


def _headers(kind: str) -> Headers:
    return [("event-type", kind.encode()), ("schema-version", b"1")]


def _assert_paths_agree(kind: str, value: bytes, headers: Headers) -> None:
    fast = decoding._valid_event(kind, value, headers, MAX_BYTES)
    checked = decoding._checked_event(kind, value, headers, MAX_BYTES)
    if fast is not None:
        assert not isinstance(checked, Poison), f"only the fast path accepts it: {checked}"
        assert fast == checked
        assert type(fast) is type(checked)


def _example_paths() -> list[Any]:
    return [
        pytest.param(path, id=f"{path.parent.parent.name}/{path.parent.name}/{path.stem}")
        for name in KINDS
        for path in sorted((EXAMPLES / name).glob("*/*.json"))
    ]


@pytest.mark.parametrize("path", _example_paths())
def test_both_paths_agree_on_every_example(path: Path) -> None:
    kind = KINDS[path.parent.parent.name]
    value = path.read_bytes()
    variants: list[Headers] = [
        [],
        _headers(kind),
        [("event-type", b"other")],
        [("schema-version", None)],
    ]
    for headers in variants:
        for other_kind in KINDS.values():
            _assert_paths_agree(other_kind, value, headers)
    if path.parent.name == "valid":
        assert decoding._valid_event(kind, value, _headers(kind), MAX_BYTES) is not None


@given(event_dicts())
def test_a_valid_event_takes_the_fast_path_to_the_same_event(event: JsonObject) -> None:
    kind = event["event_type"]
    value = orjson.dumps(event)
    assert decoding._valid_event(kind, value, _headers(kind), MAX_BYTES) is not None
    _assert_paths_agree(kind, value, _headers(kind))


@given(st.data(), event_dicts())
def test_both_paths_agree_on_events_broken_anywhere(data: st.DataObject, event: Any) -> None:
    broken = data.draw(_broken(event))
    try:
        value = orjson.dumps(broken)
    except TypeError:  # an integer beyond 64 bits, which orjson does not write; LSC's JSON may
        value = json.dumps(broken).encode()
    _assert_paths_agree(event["event_type"], value, _headers(event["event_type"]))


# Text a JSON parser may read in its own way: repeated keys, escapes, numbers, what surrounds it.
_EDITS = [
    (b'"title":', b'"title":"other","title":'),
    (b'"agency_id":', b'"agency_id":"someone-else","agency_id":'),
    (b'"schema_version":1', b'"schema_version":1.0'),
    (b'"schema_version":1', b'"schema_version":1e0'),
    (b'"schema_version":1', b'"schema_version":true'),
    (b'"schema_version":1', b'"schema_version":NaN'),
    (b'"building_id":"', b'"building_id":"\\ud800'),
    (b'"building_id":"', b'"building_id":"\\u0041'),
    (b'"building_id":"', b'"building_id":"\xff'),
    (b'"building_id":"', b'"building_id":"\x01'),
    (b"{", b"\xef\xbb\xbf{"),
    (b"{", b" \n{"),
]


@pytest.mark.parametrize(("old", "new"), _EDITS)
@given(event=event_dicts())
def test_both_paths_agree_on_json_a_parser_may_read_differently(
    old: bytes, new: bytes, event: JsonObject
) -> None:
    kind = event["event_type"]
    value = orjson.dumps(event).replace(old, new, 1)
    _assert_paths_agree(kind, value, _headers(kind))
    _assert_paths_agree(kind, value + b"\n", _headers(kind))
    _assert_paths_agree(kind, value + b"x", _headers(kind))


def test_a_header_that_disagrees_is_still_named() -> None:
    event = orjson.loads(
        (EXAMPLES / "document-created.v1" / "valid").glob("*.json").__next__().read_bytes()
    )
    decoded = decode_record(
        topic_kind="document-created",
        key=f"{event['agency_id']}:{event['building_id']}".encode(),
        value=orjson.dumps(event),
        headers=[("event-type", b"manifest-snapshot")],
        max_value_bytes=MAX_BYTES,
    )
    assert isinstance(decoded, Poison)
    assert decoded.reason is decoding.PoisonReason.HEADER_MISMATCH
