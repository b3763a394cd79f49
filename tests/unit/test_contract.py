"""The JSON Schemas in ``schemas/`` and the structs in ``consumer.core.events`` are one contract.

Every example beside the schemas is judged the same way by both: the JSON Schema (draft 2020-12,
formats checked) of what a JSON parser reads, and the structs given the bytes, as decoding reads
a record. Generated events satisfy both, and so do the answers of both to events broken in random
places and to text a JSON parser may read in its own way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource

from consumer.core.events import DocumentCreated, Event, ManifestSnapshot, as_json, read_event
from tests.strategies import (
    JsonObject,
    document_created_dicts,
    event_dicts,
    manifest_part_dicts,
)

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
EXAMPLES = SCHEMAS / "examples"
MODELS: dict[str, type[Event]] = {
    "document-created.v1": DocumentCreated,
    "manifest-snapshot.v1": ManifestSnapshot,
}


def _load_schemas() -> dict[str, dict[str, Any]]:
    return {
        path.name.removesuffix(".schema.json"): json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(SCHEMAS.glob("*.schema.json"))
    }


SCHEMA_DOCUMENTS = _load_schemas()
REGISTRY: Registry[Any] = Registry().with_resources(
    (schema["$id"], Resource.from_contents(schema)) for schema in SCHEMA_DOCUMENTS.values()
)


def schema_validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(
        SCHEMA_DOCUMENTS[name], registry=REGISTRY, format_checker=FormatChecker()
    )


def schema_accepts(name: str, instance: object) -> bool:
    accepted: bool = schema_validator(name).is_valid(instance)
    return accepted


def encoded(instance: object) -> bytes:
    try:
        return orjson.dumps(instance)
    except TypeError:  # an integer beyond 64 bits, which orjson does not write; LSC's JSON may
        return json.dumps(instance).encode()


def decoded(name: str, value: bytes) -> Event | None:
    """The event the structs read from ``value``, when it is one of the schema ``name``."""
    try:
        event = read_event(value)
    except (msgspec.MsgspecError, RecursionError):
        return None
    return event if isinstance(event, MODELS[name]) else None


def model_accepts(name: str, instance: object) -> bool:
    return decoded(name, encoded(instance)) is not None


def _examples(kind: str) -> list[Any]:
    return [
        pytest.param(path, id=f"{path.parent.parent.name}/{path.stem}")
        for path in sorted(EXAMPLES.glob(f"*/{kind}/*.json"))
    ]


def _load_example(path: Path) -> tuple[str, object]:
    # Parsed by a JSON parser, so that 12.0 stays a float.
    return path.parent.parent.name, orjson.loads(path.read_bytes())


def test_every_schema_is_a_valid_2020_12_schema_with_an_id() -> None:
    for schema in SCHEMA_DOCUMENTS.values():
        Draft202012Validator.check_schema(schema)
        assert schema["$id"].startswith("urn:chouette-relay:schemas:")


def test_formats_are_checked_not_merely_annotated() -> None:
    # Without rfc3339-validator installed, jsonschema silently skips "date-time".
    assert {"date", "date-time", "uuid"} <= set(FormatChecker().checkers)


def test_every_example_directory_names_a_schema() -> None:
    for directory in EXAMPLES.iterdir():
        assert directory.name in SCHEMA_DOCUMENTS
        assert {child.name for child in directory.iterdir()} == {"valid", "invalid"}


def test_each_event_has_a_broad_invalid_corpus() -> None:
    for name in MODELS:
        assert len(list((EXAMPLES / name / "invalid").glob("*.json"))) >= 12


@pytest.mark.parametrize("path", _examples("valid"))
def test_valid_example_is_accepted_by_schema_and_model(path: Path) -> None:
    name, instance = _load_example(path)
    schema_validator(name).validate(instance)
    if name in MODELS:
        assert decoded(name, path.read_bytes()) is not None, "the structs refuse it"


@pytest.mark.parametrize("path", _examples("invalid"))
def test_invalid_example_is_rejected_by_schema_and_model(path: Path) -> None:
    name, instance = _load_example(path)
    assert not schema_accepts(name, instance), "the schema accepts it"
    if name in MODELS:
        assert decoded(name, path.read_bytes()) is None, "the structs accept it"


@given(document_created_dicts())
def test_generated_document_created_events_satisfy_schema_and_model(event: JsonObject) -> None:
    assert schema_accepts("document-created.v1", event)
    assert model_accepts("document-created.v1", event)


@given(manifest_part_dicts())
def test_generated_manifest_parts_satisfy_schema_and_model(event: JsonObject) -> None:
    assert schema_accepts("manifest-snapshot.v1", event)
    assert model_accepts("manifest-snapshot.v1", event)


@given(event_dicts())
def test_an_event_written_as_json_satisfies_the_schema_again(event: JsonObject) -> None:
    name = f"{event['event_type']}.v1"
    read = decoded(name, orjson.dumps(event))
    assert read is not None
    written = orjson.dumps(as_json(read))
    assert schema_accepts(name, orjson.loads(written))
    assert decoded(name, written) == read


# Values that are valid somewhere in the contract, almost valid, or of the wrong JSON type.
_TRICKY_STRINGS = [
    "",
    " ",
    "1",
    "12",
    "ag",
    "ged",
    "owners",
    "tenants",
    "application/pdf",
    "document-created",
    "manifest-snapshot",
    "a" * 64,
    "A" * 64,
    "https://documents.lsc.example/1.pdf",
    "https://documents.lsc.example/1.pdf\n",
    "ftp://documents.lsc.example/1.pdf",
    "JVBERi0xLjc=",
    "JVBERi0xLjc",
    "2024-04-30",
    "2024-02-30",
    "2024-04-30\n",
    "2024-05-06T09:15:02Z",
    "2024-05-06T09:15:02.123456789-23:59",
    "2024-05-06T09:15:02",
    "2024-05-06t09:15:02z",
    "2024-05-06T09:15:60Z",
    "0999-05-06T09:15:02Z",
    "6f1c1d8e-3a55-4c2e-9a51-0c2f8d2e7b10",
    "{6f1c1d8e-3a55-4c2e-9a51-0c2f8d2e7b10}",
    "ag-lyon-3",
    "ag:lyon",
    "é",
]
_LEAVES: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, 1, 2, -1, 10_000, 10_001, 1_000_000, 1_000_001, 2**53 - 1, 2**53]),
    st.sampled_from([0.0, 1.0, 1.5, 12.0, -1.0, 1e300]),
    st.integers(),
    st.sampled_from(_TRICKY_STRINGS),
    st.text(max_size=5),
    st.just([]),
    st.just({}),
)


@st.composite
def _broken(draw: st.DrawFn, event: JsonObject) -> object:
    """The event with one place replaced, removed or added to."""
    broken: Any = orjson.loads(orjson.dumps(event))
    parent: Any = None
    place: Any = None
    node = broken
    while isinstance(node, dict | list) and node and draw(st.booleans()):
        place = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        parent, node = node, node[place]
    if parent is None:
        return draw(_LEAVES) if draw(st.booleans()) else {**broken, "unexpected": draw(_LEAVES)}
    action = draw(st.sampled_from(["replace", "remove", "add"]))
    if action == "remove":
        del parent[place]
    elif action == "add" and isinstance(node, dict):
        node[draw(st.sampled_from(["unexpected", "url", "inline_base64"]))] = draw(_LEAVES)
    else:
        parent[place] = draw(_LEAVES)
    return broken


@given(st.data(), event_dicts())
def test_schema_and_model_agree_on_events_broken_anywhere(data: st.DataObject, event: Any) -> None:
    name = f"{event['event_type']}.v1"
    broken = data.draw(_broken(event))
    assert schema_accepts(name, broken) == model_accepts(name, broken)


# Text a JSON parser may read in its own way: repeated keys, escapes, numbers, what surrounds it.
_EDITS = [
    (b'"title":', b'"title":"other","title":'),
    (b'"agency_id":', b'"agency_id":"someone-else","agency_id":'),
    (b'"event_type":', b'"event_type":"another","event_type":'),
    (b'"schema_version":1', b'"schema_version":1.0'),
    (b'"schema_version":1', b'"schema_version":1e0'),
    (b'"schema_version":1', b'"schema_version":true'),
    (b'"schema_version":1', b'"schema_version":NaN'),
    (b'"schema_version":1', b'"schema_version":1e400'),
    (b'"building_id":"', b'"building_id":"\\ud800'),
    (b'"building_id":"', b'"building_id":"\\u0041'),
    (b'"building_id":"', b'"building_id":"\xff'),
    (b'"building_id":"', b'"building_id":"\x01'),
    (b"{", b"\xef\xbb\xbf{"),
    (b"{", b" \n{"),
]


def _parsed(value: bytes) -> object:
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return None


@pytest.mark.parametrize(("old", "new"), _EDITS)
@given(event=event_dicts())
def test_the_structs_accept_only_json_a_parser_reads_as_the_schema_accepts_it(
    old: bytes, new: bytes, event: JsonObject
) -> None:
    # The structs may refuse more (a repeated event_type that contradicts itself), never less.
    name = f"{event['event_type']}.v1"
    value = orjson.dumps(event).replace(old, new, 1)
    for variant in (value, value + b"\n", value + b"x"):
        read = decoded(name, variant)
        if read is not None:
            parsed = _parsed(variant)
            assert schema_accepts(name, parsed)
            assert read == decoded(name, orjson.dumps(parsed))
