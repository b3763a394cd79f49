"""State records: the values of the changelog topic that holds the relay's published view.

A document record is keyed ``"{agency}:{building}:{document_id}"``, a building record
``"{agency}:{building}"``; a tombstone (``None`` value) withdraws either. Values are JSON with
``schema_version: 1`` and ``kind`` (``schemas/state-record.v1.schema.json``). Restoring a partition
and live processing apply the very same records, so the two paths cannot drift.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from consumer.core.events import Document, Module
from consumer.errors import RelayError

SCHEMA_VERSION = 1
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)


class StateDecodeError(RelayError):
    """A changelog record this relay cannot read: corrupt, or written by a newer schema."""

    fatal = True


def to_epoch_us(value: dt.datetime) -> int:
    """Microseconds since the epoch; a naive datetime is taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return (value - _EPOCH) // _MICROSECOND


def from_epoch_us(value: int) -> dt.datetime:
    """The UTC datetime ``value`` microseconds after the epoch."""
    return _EPOCH + dt.timedelta(microseconds=value)


@dataclass(frozen=True, slots=True)
class BuildingKey:
    """One building of one agency. Agency and building ids never contain ``:``."""

    agency_id: str
    building_id: str

    def encode(self) -> bytes:
        return f"{self.agency_id}:{self.building_id}".encode()


@dataclass(frozen=True, slots=True)
class DocKey:
    """One document of one building. Document ids may contain ``:``; the two ids before never do."""

    agency_id: str
    building_id: str
    document_id: str

    def encode(self) -> bytes:
        return f"{self.agency_id}:{self.building_id}:{self.document_id}".encode()

    @property
    def building(self) -> BuildingKey:
        return BuildingKey(self.agency_id, self.building_id)


@dataclass(frozen=True, slots=True)
class AgencyKey:
    """The operator's controls of one agency (paused, approved plan), one record per partition.

    Encoded ``"{agency}:~agency"``: a building id never starts with ``~``, so it cannot collide.
    """

    agency_id: str

    def encode(self) -> bytes:
        return f"{self.agency_id}:{AGENCY_MARKER}".encode()


AGENCY_MARKER = "~agency"


def decode_key(raw: bytes) -> DocKey | BuildingKey | AgencyKey:
    """Read a changelog key: three parts name a document, two a building (or agency controls)."""
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise StateDecodeError(f"state key {raw!r} is not UTF-8") from exc
    parts = text.split(":", 2)
    if any(not part for part in parts) or len(parts) == 1:
        raise StateDecodeError(f"state key {text!r} is not agency:building[:document]")
    if len(parts) == 2:
        if parts[1] == AGENCY_MARKER:
            return AgencyKey(parts[0])
        return BuildingKey(parts[0], parts[1])
    return DocKey(parts[0], parts[1], parts[2])


class DocStatus(StrEnum):
    PUBLISHED = "published"  # on the partner: remote id and sha256 known
    BASELINE = "baseline"  # listed at cut-over (fresh, or before the since date): never sent
    UPLOADING = "uploading"  # upload intent written before the partner call
    DELETE_HELD = "delete_held"  # on the partner; the mass-deletion guard holds its withdrawal
    PARKED = "parked"  # needs an operator (unmapped building, bad credentials)
    # LSC's newest version is one routing does not forward (e.g. its audience became owners):
    # not on the partner, kept until a manifest taken after it, so that an older manifest read
    # late cannot bring an earlier version back
    FILTERED = "filtered"


@dataclass(frozen=True, slots=True)
class DocumentRecord:
    """What the relay knows about one document.

    ``seen_at`` is the ``occurred_at`` of the document-created event or the ``taken_at`` of the
    manifest that listed it. ``document`` is kept for parked records only, so that they can be
    retried once an operator fixes the configuration; everything else is redone from the input,
    which is read again from the last committed offset.
    """

    key: DocKey
    status: DocStatus
    sha256: str
    module: Module
    seen_at: dt.datetime
    document_date: dt.date
    size_bytes: int
    remote_id: str | None = None
    condominium_id: str | None = None
    held_by: str | None = None
    parked_reason: str | None = None
    document: Document | None = None


@dataclass(frozen=True, slots=True)
class BuildingRecord:
    """Per building: the ``taken_at`` of the newest complete manifest applied, per module."""

    agency_id: str
    building_id: str
    manifest_taken_at: Mapping[Module, dt.datetime] = field(default_factory=dict)
    first_publication_done: bool = False

    @property
    def key(self) -> BuildingKey:
        return BuildingKey(self.agency_id, self.building_id)


@dataclass(frozen=True, slots=True)
class AgencyRecord:
    """Operator controls of one agency, written to every partition that learns them.

    ``paused``: nothing of the agency is sent (its work waits, offsets stay uncommitted).
    ``approved_plan``: the fingerprint of the first-publication plan an operator approved, for
    ``approved_modules`` (a module enabled later is a new first publication, approved anew).
    """

    agency_id: str
    paused: bool = False
    changed_by: str = ""
    changed_at: dt.datetime | None = None
    approved_plan: str | None = None
    approved_modules: frozenset[Module] = frozenset()

    @property
    def key(self) -> AgencyKey:
        return AgencyKey(self.agency_id)


@dataclass(frozen=True, slots=True)
class Tombstone:
    """Withdraws a document (or a building record) from the view; compaction then forgets it."""

    key: DocKey | BuildingKey | AgencyKey


StateRecord = DocumentRecord | BuildingRecord | AgencyRecord | Tombstone


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
        }
        return record.key.encode(), orjson.dumps(value)
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
        "document": None if record.document is None else record.document.model_dump(mode="json"),
    }
    return record.key.encode(), orjson.dumps(value)


def decode_state(key: bytes, value: bytes | None) -> StateRecord:
    """Read one changelog record; raises ``StateDecodeError`` on anything it cannot trust."""
    decoded_key = decode_key(key)
    if value is None:
        return Tombstone(decoded_key)
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


def _decode_value(key: DocKey | BuildingKey | AgencyKey, data: dict[str, Any]) -> StateRecord:
    kind = data["kind"]
    if kind == "agency" and isinstance(key, AgencyKey):
        paused = data["paused"]
        if not isinstance(paused, bool):
            raise TypeError("paused is not a boolean")
        changed_at = data["changed_at"]
        return AgencyRecord(
            agency_id=key.agency_id,
            paused=paused,
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
            document=None
            if document is None
            else Document.model_validate_json(orjson.dumps(document)),
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
