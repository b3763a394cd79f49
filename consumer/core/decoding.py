"""Turning a raw Kafka record into an event, or into poison with a machine-readable reason.

``decode_record`` parses and validates a valid value in one pass (pydantic, from the bytes), then
checks what the schema cannot say: the Kafka key and headers against the body, the topic against
the event type, and the numbering and counts of a manifest part. A value that fails goes the long
way (orjson, then pydantic), where checks run from the outside in, so the
reason is the most specific one: null and size, UTF-8, JSON, an object; then the schema version
(a newer version may differ in anything else), the event type and its topic, the headers; then
the schema (a URL the relay could never fetch is named apart); then the key; then the rules across
fields of a manifest part; last the event's time against the caller's clock, which decoding never
reads itself.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Final, Literal

import orjson
from pydantic import ValidationError

from consumer.core.events import DocumentCreated, Event, ManifestSnapshot
from consumer.core.poison import Poison, PoisonReason, quote, schema_poison

# What callers read here; the poison reasons live with how a violation is told.
__all__ = ["Poison", "PoisonReason", "TopicKind", "claimed_snapshot", "decode_record"]

TopicKind = Literal["document-created", "manifest-snapshot"]

_MODELS: Final[dict[str, type[DocumentCreated] | type[ManifestSnapshot]]] = {
    "document-created": DocumentCreated,
    "manifest-snapshot": ManifestSnapshot,
}
# Their validators, called directly: the hot path skips ``model_validate_json``'s Python wrapper.
_VALIDATORS: Final = {kind: model.__pydantic_validator__ for kind, model in _MODELS.items()}
_SCHEMA_VERSION: Final = 1
_EVENT_TYPE_HEADER: Final = "event-type"
_SCHEMA_VERSION_HEADER: Final = "schema-version"
# The header values of a valid event of each topic (headers may also be absent).
_HEADERS: Final[dict[str, dict[str, bytes | None]]] = {
    kind: {_EVENT_TYPE_HEADER: kind.encode(), _SCHEMA_VERSION_HEADER: str(_SCHEMA_VERSION).encode()}
    for kind in _MODELS
}


def decode_record(
    *,
    topic_kind: TopicKind | str,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]],
    max_value_bytes: int,
    not_after: dt.datetime | None = None,
) -> Event | Poison:
    """Decode one record read from the topic of ``topic_kind``.

    An event dated after ``not_after`` (the caller's clock plus the clock skew it allows) is
    poison: a manifest from the future would make every later one of its building stale, a
    document from the future would outlive every later manifest. Never raises for any key, value
    or headers. Raises ``ValueError`` only for a ``topic_kind`` that is not an event topic, which
    is a wiring mistake rather than bad input.
    """
    if topic_kind not in _MODELS:
        raise ValueError(f"not an event topic kind: {topic_kind!r}")
    event = _valid_event(topic_kind, value, headers, max_value_bytes)
    if event is None:
        checked = _checked_event(topic_kind, value, headers, max_value_bytes)
        if isinstance(checked, Poison):
            return checked
        event = checked
    poison = _check_key(event, key)
    if poison is None and isinstance(event, ManifestSnapshot):
        poison = _check_manifest_part(event)
    if poison is None and not_after is not None:
        poison = _check_time(event, not_after)
    return event if poison is None else poison


def _valid_event(
    topic_kind: str,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]],
    max_value_bytes: int,
) -> Event | None:
    """The event, when the value is one the checks below would all pass; None otherwise.

    The common case: pydantic parses and validates the bytes in one pass in its Rust core. A value
    it accepts has the topic's event type and schema version 1, so it passes the outside-in checks
    of ``_checked_event`` with the same result (its parser accepts no JSON that orjson refuses, and
    keeps the last of repeated keys as orjson does; a test holds the two paths equal). Anything
    else goes the long way, which names the reason.
    """
    if value is None or len(value) > max_value_bytes:
        return None
    expected = _HEADERS[topic_kind]
    for name, raw in headers:
        if raw != expected.get(name, raw):
            return None
    try:
        event: Event = _VALIDATORS[topic_kind].validate_json(value)
    except ValidationError:
        return None
    return event


def _checked_event(
    topic_kind: str,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]],
    max_value_bytes: int,
) -> Event | Poison:
    """Parse (orjson) and validate (pydantic, python mode), checking from the outside in."""
    body = _parse_object(value, max_value_bytes)
    if isinstance(body, Poison):
        return body
    poison = _check_version_and_type(body, topic_kind) or _check_headers(body, headers)
    if poison is not None:
        return poison
    # The event type is known and matches the topic by now, or is left for the schema to reject.
    try:
        return _MODELS[topic_kind].model_validate(body)
    except ValidationError as error:
        return schema_poison(error)


def claimed_snapshot(key: bytes | None, value: bytes | None) -> tuple[str, str, str] | None:
    """The (agency, building, snapshot id) a poison manifest record names, when its key agrees.

    Its siblings can then be let go at once instead of waiting for the expiry; a record whose key
    names another building (or none) is not trusted to speak for any snapshot.
    """
    try:
        body = orjson.loads(value) if value is not None else None
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict):
        return None
    agency, building, snapshot = (body.get(f) for f in ("agency_id", "building_id", "snapshot_id"))
    if not (isinstance(agency, str) and isinstance(building, str) and isinstance(snapshot, str)):
        return None
    if key != f"{agency}:{building}".encode():
        return None
    return agency, building, snapshot


def _parse_object(value: bytes | None, max_value_bytes: int) -> dict[str, object] | Poison:
    if value is None:
        return Poison(PoisonReason.NULL_VALUE, "the record has no value (a tombstone)")
    if len(value) > max_value_bytes:
        return Poison(
            PoisonReason.OVERSIZED,
            f"the value has {len(value)} bytes, more than the limit of {max_value_bytes}",
        )
    try:
        body = orjson.loads(value)
    except orjson.JSONDecodeError as error:
        return _unparsable(value, error)
    if not isinstance(body, dict):
        return Poison(PoisonReason.NOT_AN_OBJECT, f"the value is a JSON {_json_type(body)}")
    return body


def _unparsable(value: bytes, error: orjson.JSONDecodeError) -> Poison:
    # orjson refuses invalid UTF-8 too; telling the two apart costs a decode on this path only.
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as not_utf8:
        return Poison(
            PoisonReason.NOT_UTF8,
            f"the value is not UTF-8: byte {not_utf8.start} ({not_utf8.reason})",
        )
    return Poison(PoisonReason.NOT_JSON, f"the value is not JSON: {error}")


def _check_version_and_type(body: dict[str, object], topic_kind: str) -> Poison | None:
    version = body.get("schema_version")
    # A version of another JSON type is a schema violation, not an unknown version.
    if _is_json_integer(version) and version != _SCHEMA_VERSION:
        return Poison(
            PoisonReason.UNKNOWN_SCHEMA_VERSION,
            f"schema_version {version!r} is not one this relay reads ({_SCHEMA_VERSION})",
        )
    event_type = body.get("event_type")
    if isinstance(event_type, str) and event_type not in _MODELS:
        return Poison(
            PoisonReason.UNKNOWN_EVENT_TYPE, f"event_type {quote(event_type)} is not known"
        )
    if isinstance(event_type, str) and event_type != topic_kind:
        return Poison(
            PoisonReason.WRONG_TOPIC,
            f"a {event_type} event was published on the {topic_kind} topic",
        )
    return None


def _check_headers(
    body: dict[str, object], headers: Sequence[tuple[str, bytes | None]]
) -> Poison | None:
    """Headers may be absent; when present they must agree with the body."""
    event_type = body.get("event_type")
    version = body.get("schema_version")
    for name, raw in headers:
        if name == _EVENT_TYPE_HEADER and isinstance(event_type, str):
            expected = event_type
        elif name == _SCHEMA_VERSION_HEADER and _is_json_integer(version):
            expected = str(_SCHEMA_VERSION)
        else:
            continue
        if raw != expected.encode():
            shown = "no value" if raw is None else quote(raw.decode("utf-8", "backslashreplace"))
            return Poison(
                PoisonReason.HEADER_MISMATCH,
                f"header {name} has {shown} but the body says {quote(expected)}",
            )
    return None


def _check_key(event: Event, key: bytes | None) -> Poison | None:
    if not key:
        return Poison(
            PoisonReason.KEY_MISSING, "the record has no key; events are keyed agency:building"
        )
    expected = f"{event.agency_id}:{event.building_id}"
    if key != expected.encode():
        shown = quote(key.decode("utf-8", "backslashreplace"))
        return Poison(
            PoisonReason.KEY_MISMATCH, f"the key is {shown} but the body says {quote(expected)}"
        )
    return None


def _check_manifest_part(manifest: ManifestSnapshot) -> Poison | None:
    if manifest.part > manifest.parts:
        return Poison(
            PoisonReason.PART_OUT_OF_RANGE, f"part {manifest.part} of only {manifest.parts}"
        )
    listed = len(manifest.items)
    if listed > manifest.item_count or (manifest.parts == 1 and listed != manifest.item_count):
        return Poison(
            PoisonReason.ITEM_COUNT_MISMATCH,
            f"part {manifest.part} of {manifest.parts} lists {listed} items"
            f" for an item_count of {manifest.item_count}",
        )
    covered = set(manifest.modules)
    seen: set[str] = set()
    for index, item in enumerate(manifest.items):
        if item.module not in covered:
            return Poison(
                PoisonReason.ITEM_OUT_OF_SCOPE,
                f"items[{index}] is of module {item.module}, which the manifest does not cover",
            )
        if item.id in seen:
            return Poison(
                PoisonReason.DUPLICATE_ITEM_ID, f"items[{index}] repeats document id {item.id}"
            )
        seen.add(item.id)
    return None


def _check_time(event: Event, not_after: dt.datetime) -> Poison | None:
    # The reason is looked up only for an event from the future: the hot path only compares.
    moment = event.taken_at if isinstance(event, ManifestSnapshot) else event.occurred_at
    if moment <= not_after:
        return None
    if isinstance(event, ManifestSnapshot):
        reason, name = PoisonReason.TAKEN_AT_IN_FUTURE, "taken_at"
    else:
        reason, name = PoisonReason.OCCURRED_AT_IN_FUTURE, "occurred_at"
    return Poison(
        reason,
        f"{name} {moment.isoformat()} is later than {not_after.isoformat()}, the relay's clock"
        " plus the clock skew it allows",
    )


def _is_json_integer(value: object) -> bool:
    """Whether JSON Schema sees an integer: 2 and 2.0 are, true is not."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"
