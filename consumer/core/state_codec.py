"""The changelog's bytes of a state record: ``encode_state`` and ``decode_state``.

Values are JSON with ``schema_version: 1`` and ``kind`` (``schemas/state-record.v1.schema.json``),
except document records without a full document, written in the compact binary form of version 2
(``state_compact``); both forms are read forever, since a compacted topic is never rewritten.
Anything this relay cannot trust raises ``StateDecodeError``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson

from consumer.core.events import Module, as_json, read_document
from consumer.core.state import (
    AgencyKey,
    AgencyRecord,
    BuildingKey,
    BuildingRecord,
    DocKey,
    DocStatus,
    DocumentRecord,
    HeldManifest,
    HoldDecision,
    LateCopyChecks,
    StateDecodeError,
    StateRecord,
    Tombstone,
    decode_key,
    from_epoch_us,
    to_epoch_us,
)
from consumer.core.state_compact import (
    COMPACT_FORM,
    compact_document,
    compact_is_valid,
    unpack_compact,
)

SCHEMA_VERSION = 1


def _timestamp(value: dt.datetime) -> str:
    return from_epoch_us(to_epoch_us(value)).isoformat().replace("+00:00", "Z")


def encode_state(record: StateRecord) -> tuple[bytes, bytes | None]:
    """The changelog key and value of ``record`` (``None`` value for a tombstone)."""
    if isinstance(record, Tombstone):
        return record.key.encode(), None
    if isinstance(record, AgencyRecord):
        agency: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "kind": "agency",
            "paused": record.paused,
            "backfill_paused": record.backfill_paused,
            "changed_by": record.changed_by,
            "changed_at": None if record.changed_at is None else _timestamp(record.changed_at),
            "approved_plan": record.approved_plan,
            "approved_modules": sorted(str(module) for module in record.approved_modules),
        }
        return record.key.encode(), orjson.dumps(agency)
    if isinstance(record, BuildingRecord):
        value: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "kind": "building",
            "manifest_taken_at": {
                str(module): _timestamp(taken_at)
                for module, taken_at in sorted(record.manifest_taken_at.items())
            },
            "first_publication_done": record.first_publication_done,
            "held": None if record.held is None else _held_value(record.held),
        }
        return record.key.encode(), orjson.dumps(value)
    compact = compact_document(record)
    if compact is not None:
        return record.key.encode(), compact
    value = {
        "schema_version": SCHEMA_VERSION,
        "kind": "document",
        "status": str(record.status),
        "sha256": record.sha256,
        "module": str(record.module),
        "seen_at": _timestamp(record.seen_at),
        "document_date": record.document_date.isoformat(),
        "size_bytes": record.size_bytes,
        "remote_id": record.remote_id,
        "condominium_id": record.condominium_id,
        "held_by": record.held_by,
        "parked_reason": record.parked_reason,
        "document": None if record.document is None else as_json(record.document),
    }
    if record.late_copy_checks is not None:  # absent otherwise, as in records written before
        value["late_copy_checks"] = {
            "since": _timestamp(record.late_copy_checks.since),
            "left": record.late_copy_checks.left,
        }
    return record.key.encode(), orjson.dumps(value)


def _held_value(held: HeldManifest) -> dict[str, Any]:
    return {
        "snapshot_id": held.snapshot_id,
        "taken_at": _timestamp(held.taken_at),
        "modules": sorted(str(module) for module in held.modules),
        "decision": None if held.decision is None else str(held.decision),
    }


def _held_manifest(value: object) -> HeldManifest | None:
    """A building record's held manifest; records written before holds were kept have none."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError("held is not an object")
    snapshot_id = _string(value, "snapshot_id")
    if not snapshot_id:
        raise ValueError("held has no snapshot_id")
    decision = _string(value, "decision")
    return HeldManifest(
        snapshot_id=snapshot_id,
        taken_at=_parse_timestamp(value["taken_at"]),
        modules=frozenset(Module(module) for module in value["modules"]),
        decision=None if decision is None else HoldDecision(decision),
    )


def _late_copy_checks(value: object) -> LateCopyChecks | None:
    """A document record's late-copy checks; records written before they were kept have none."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError("late_copy_checks is not an object")
    left = value["left"]
    if not isinstance(left, int) or isinstance(left, bool) or left < 1:
        raise ValueError("late_copy_checks.left is not a positive integer")
    return LateCopyChecks(since=_parse_timestamp(value["since"]), left=left)


def decode_state(key: bytes, value: bytes | None) -> StateRecord:
    """Read one changelog record; raises ``StateDecodeError`` on anything it cannot trust."""
    decoded_key = decode_key(key)
    if value is None:
        return Tombstone(decoded_key)
    if value and value[0] == COMPACT_FORM:
        return _decode_compact(decoded_key, value)
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise StateDecodeError(f"state record {key!r} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise StateDecodeError(f"state record {key!r} is not a JSON object")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise StateDecodeError(
            f"state record {key!r} has schema_version {data.get('schema_version')!r}; "
            f"this relay reads version {SCHEMA_VERSION} only"
        )
    try:
        return _decode_value(decoded_key, data)
    except (KeyError, TypeError, ValueError) as exc:
        raise StateDecodeError(f"state record {key!r} is malformed: {exc!r}") from exc


def _decode_compact(key: DocKey | BuildingKey | AgencyKey, value: bytes) -> DocumentRecord:
    if not isinstance(key, DocKey):
        raise StateDecodeError(f"a compact document record does not fit a {type(key).__name__}")
    if not compact_is_valid(value):
        raise StateDecodeError(f"compact state record {key.encode()!r} is malformed")
    return unpack_compact(key, value)


def _decode_value(key: DocKey | BuildingKey | AgencyKey, data: dict[str, Any]) -> StateRecord:
    kind = data["kind"]
    if kind == "agency" and isinstance(key, AgencyKey):
        paused = data["paused"]
        if not isinstance(paused, bool):
            raise TypeError("paused is not a boolean")
        backfill_paused = data.get("backfill_paused", False)  # absent from older records
        if not isinstance(backfill_paused, bool):
            raise TypeError("backfill_paused is not a boolean")
        changed_at = data["changed_at"]
        return AgencyRecord(
            agency_id=key.agency_id,
            paused=paused,
            backfill_paused=backfill_paused,
            changed_by=_string(data, "changed_by") or "",
            changed_at=None if changed_at is None else _parse_timestamp(changed_at),
            approved_plan=_string(data, "approved_plan"),
            approved_modules=frozenset(Module(m) for m in data["approved_modules"]),
        )
    if kind == "building" and isinstance(key, BuildingKey):
        taken = data["manifest_taken_at"]
        if not isinstance(taken, dict):
            raise TypeError("manifest_taken_at is not an object")
        first_done = data["first_publication_done"]
        if not isinstance(first_done, bool):
            raise TypeError("first_publication_done is not a boolean")
        return BuildingRecord(
            agency_id=key.agency_id,
            building_id=key.building_id,
            manifest_taken_at={
                Module(module): _parse_timestamp(taken_at) for module, taken_at in taken.items()
            },
            first_publication_done=first_done,
            held=_held_manifest(data.get("held")),
        )
    if kind == "document" and isinstance(key, DocKey):
        size = data["size_bytes"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise TypeError("size_bytes is not a non-negative integer")
        sha256 = _string(data, "sha256")
        if sha256 is None or len(sha256) != 64 or bytes.fromhex(sha256).hex() != sha256:
            raise ValueError("sha256 is not 64 lowercase hex digits")
        document = data["document"]
        return DocumentRecord(
            key=key,
            status=DocStatus(data["status"]),
            sha256=sha256,
            module=Module(data["module"]),
            seen_at=_parse_timestamp(data["seen_at"]),
            document_date=dt.date.fromisoformat(data["document_date"]),
            size_bytes=size,
            remote_id=_string(data, "remote_id"),
            condominium_id=_string(data, "condominium_id"),
            held_by=_string(data, "held_by"),
            parked_reason=_string(data, "parked_reason"),
            document=None if document is None else read_document(orjson.dumps(document)),
            late_copy_checks=_late_copy_checks(data.get("late_copy_checks")),
        )
    raise ValueError(f"kind {kind!r} does not fit a {type(key).__name__}")


def _string(data: dict[str, Any], name: str) -> str | None:
    value = data[name]
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} is not a string")
    return value


def _parse_timestamp(value: object) -> dt.datetime:
    if not isinstance(value, str):
        raise TypeError("timestamp is not a string")
    parsed = dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no UTC offset")
    return parsed.astimezone(dt.UTC)
