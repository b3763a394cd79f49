"""Turning a raw Kafka record into an event, or into poison with a machine-readable reason.

``decode_record`` reads a value in one pass from its bytes (msgspec), which stops at the first
violation, then checks what the schema cannot say: the topic against the event type, the Kafka
headers and key against the body, and the numbering and counts of a manifest part. A value refused
on the way is looked at again only as far as naming its reason needs, from the outside in: null
and size, UTF-8, JSON, an object; then the schema version (a newer version may differ in anything
else), the event type and its topic, the headers; then the first schema violation (a URL the
relay could never fetch is named apart); then the key; then the rules across fields of a manifest
part; last the event's time against the caller's clock, which decoding never reads itself. No step
holds more than a small multiple of the value's size, and none reads it more than a few times.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import Final, Literal

import msgspec

from consumer.core.events import DocumentCreated, Event, ManifestSnapshot, read_event
from consumer.core.poison import Poison, PoisonReason, quote, schema_poison

# What callers read here; the poison reasons live with how a violation is told.
__all__ = ["Poison", "PoisonReason", "TopicKind", "claimed_snapshot", "decode_record"]

TopicKind = Literal["document-created", "manifest-snapshot"]

# The event type of each topic: the tag msgspec reads from the body's ``event_type``.
_EVENTS: Final[dict[str, type[Event]]] = {
    "document-created": DocumentCreated,
    "manifest-snapshot": ManifestSnapshot,
}
_EVENT_TYPES: Final = {kind: event_type for event_type, kind in _EVENTS.items()}
_SCHEMA_VERSION: Final = 1
_EVENT_TYPE_HEADER: Final = "event-type"
_SCHEMA_VERSION_HEADER: Final = "schema-version"
# A JSON value's type, told by its first character (the value is known to be JSON by then).
_FIRST_CHARACTER: Final = re.compile(rb"[ \t\n\r]*(.)", re.DOTALL)
_JSON_TYPES: Final = {b"[": "array", b'"': "string", b"t": "boolean", b"f": "boolean", b"n": "null"}


class _Envelope(msgspec.Struct):
    """What the outside-in checks read of a refused value; msgspec skips every other field."""

    schema_version: msgspec.Raw = msgspec.Raw()
    event_type: msgspec.Raw = msgspec.Raw()


class _SnapshotClaim(msgspec.Struct):
    """The fields by which a poison manifest part names its snapshot."""

    agency_id: str
    building_id: str
    snapshot_id: str


_ENVELOPE: Final = msgspec.json.Decoder(_Envelope)
_CLAIM: Final = msgspec.json.Decoder(_SnapshotClaim)


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
    if topic_kind not in _EVENTS:
        raise ValueError(f"not an event topic kind: {topic_kind!r}")
    if value is None:
        return Poison(PoisonReason.NULL_VALUE, "the record has no value (a tombstone)")
    if len(value) > max_value_bytes:
        return Poison(
            PoisonReason.OVERSIZED,
            f"the value has {len(value)} bytes, more than the limit of {max_value_bytes}",
        )
    try:
        event = read_event(value)
    except msgspec.ValidationError as violation:
        return _refused(topic_kind, value, headers, violation)
    except (msgspec.DecodeError, RecursionError) as error:
        return _unreadable(value, error)
    event_type = _EVENT_TYPES[type(event)]
    poison = (
        _check_topic(event_type, topic_kind)
        or _check_headers(event_type, _SCHEMA_VERSION, headers)
        or _check_key(event, key)
    )
    if poison is None and isinstance(event, ManifestSnapshot):
        poison = _check_manifest_part(event)
    if poison is None and not_after is not None:
        poison = _check_time(event, not_after)
    return event if poison is None else poison


def _refused(
    topic_kind: str,
    value: bytes,
    headers: Sequence[tuple[str, bytes | None]],
    violation: msgspec.ValidationError,
) -> Poison:
    """Why msgspec refused ``value``, judged from the outside in.

    msgspec stopped at its first violation, so the value may still not be UTF-8 or JSON further
    on: both are checked first, then the schema version, event type and headers, which matter more
    than any other field. Only those two fields are read, the rest is skipped.
    """
    try:
        value.decode("utf-8")  # msgspec does not check the text of the fields it skips
    except UnicodeDecodeError as not_utf8:
        return _not_utf8(not_utf8)
    try:
        envelope = _ENVELOPE.decode(value)
    except msgspec.ValidationError:  # before its base class DecodeError
        try:
            # Not an object at its first character: it may not be JSON at all further on.
            # Decoded as Raw, the value is only scanned, nothing is built.
            msgspec.json.decode(value, type=msgspec.Raw)
        except (msgspec.DecodeError, RecursionError) as error:
            return _not_json(error)
        first = _FIRST_CHARACTER.match(value)
        shown = _JSON_TYPES.get(first[1] if first else b"", "number")
        return Poison(PoisonReason.NOT_AN_OBJECT, f"the value is a JSON {shown}")
    except (msgspec.DecodeError, RecursionError) as error:
        return _not_json(error)
    version = _scalar(envelope.schema_version)
    event_type = _scalar(envelope.event_type)
    poison = _check_version_and_type(version, event_type, topic_kind) or _check_headers(
        event_type, version, headers
    )
    return poison or schema_poison(violation)


def claimed_snapshot(key: bytes | None, value: bytes | None) -> tuple[str, str, str] | None:
    """The (agency, building, snapshot id) a poison manifest record names, when its key agrees.

    Its siblings can then be let go at once instead of waiting for the expiry; a record whose key
    names another building (or none) is not trusted to speak for any snapshot. Only those three
    fields are read.
    """
    if value is None:
        return None
    try:
        claim = _CLAIM.decode(value)
    except (msgspec.MsgspecError, RecursionError):
        return None
    if key != f"{claim.agency_id}:{claim.building_id}".encode():
        return None
    return claim.agency_id, claim.building_id, claim.snapshot_id


def _unreadable(value: bytes, error: Exception) -> Poison:
    # msgspec refuses invalid UTF-8 too; telling the two apart costs a decode on this path only.
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as not_utf8:
        return _not_utf8(not_utf8)
    return _not_json(error)


def _not_utf8(error: UnicodeDecodeError) -> Poison:
    return Poison(
        PoisonReason.NOT_UTF8, f"the value is not UTF-8: byte {error.start} ({error.reason})"
    )


def _not_json(error: Exception) -> Poison:
    if isinstance(error, RecursionError):
        return Poison(PoisonReason.NOT_JSON, "the value is not JSON: it is nested too deep")
    return Poison(PoisonReason.NOT_JSON, f"the value is not JSON: {error}")


_ABSENT: Final = object()


def _scalar(raw: msgspec.Raw) -> object:
    """The JSON scalar ``raw`` holds; an array or object is not read (``_ABSENT`` stands for it,
    as for a field not given), it could be as large as the value."""
    first = memoryview(raw)[:1].tobytes()
    if first in (b"", b"[", b"{"):
        return _ABSENT
    try:
        return msgspec.json.decode(raw)
    except msgspec.ValidationError:  # a number beyond a double's range: no version, no type
        return _ABSENT


def _check_version_and_type(version: object, event_type: object, topic_kind: str) -> Poison | None:
    # A version of another JSON type is a schema violation, not an unknown version.
    if _is_json_integer(version) and version != _SCHEMA_VERSION:
        return Poison(
            PoisonReason.UNKNOWN_SCHEMA_VERSION,
            f"schema_version {version!r} is not one this relay reads ({_SCHEMA_VERSION})",
        )
    if isinstance(event_type, str) and event_type not in _EVENTS:
        return Poison(
            PoisonReason.UNKNOWN_EVENT_TYPE, f"event_type {quote(event_type)} is not known"
        )
    if isinstance(event_type, str):
        return _check_topic(event_type, topic_kind)
    return None


def _check_topic(event_type: str, topic_kind: str) -> Poison | None:
    if event_type == topic_kind:
        return None
    return Poison(
        PoisonReason.WRONG_TOPIC, f"a {event_type} event was published on the {topic_kind} topic"
    )


def _check_headers(
    event_type: object, version: object, headers: Sequence[tuple[str, bytes | None]]
) -> Poison | None:
    """Headers may be absent; when present they must agree with the body."""
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
