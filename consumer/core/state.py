"""State records: the values of the changelog topic that holds the relay's published view.

A document record is keyed ``"{agency}:{building}:{document_id}"``, a building record
``"{agency}:{building}"``; a tombstone (``None`` value) withdraws either. Values are JSON with
``schema_version: 1`` and ``kind`` (``schemas/state-record.v1.schema.json``), except document
records without a full document, written in the compact binary form of version 2
(``schemas/state-record.v2.schema.json``); both forms are read forever. Restoring a partition
and live processing apply the very same records, so the two paths cannot drift.
"""

from __future__ import annotations

import datetime as dt
import struct
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


# -- the compact document form (schema version 2) ----------------------------------------------
COMPACT_FORM = 2
"""First byte of a compact document record; a JSON record starts with ``{``."""
# form, sha256, seen_at (µs since the epoch), size, document date (ordinal), status, module; then
# remote_id, condominium_id and held_by, each UTF-8 ended by a NUL byte, empty when absent.
COMPACT_HEAD = struct.Struct("<B32sqQIBB")
COMPACT_SEEN_AT = struct.Struct("<q")
COMPACT_SHA_AT = 1
COMPACT_SEEN_AT_AT = 33
COMPACT_STATUS_AT = 53
COMPACT_MODULE_AT = 54
COMPACT_FIELDS = struct.Struct("<B32xq8xIBB")
"""The fixed fields that can be out of range: what checking a compact record reads."""
# The codes are part of the format: a new status or module is appended, never inserted. Parked
# records carry their full document and keep the JSON form.
COMPACT_STATUSES = (
    DocStatus.PUBLISHED,
    DocStatus.BASELINE,
    DocStatus.UPLOADING,
    DocStatus.DELETE_HELD,
    DocStatus.FILTERED,
)
COMPACT_MODULES = (
    Module.AG,
    Module.CONTRATS,
    Module.CARNET_ENTRETIEN,
    Module.DIAGNOSTICS,
    Module.ASSURANCES,
    Module.REGLEMENT,
    Module.COMPTES,
    Module.GED,
)
COMPACT_STATUS_CODES = {status: code for code, status in enumerate(COMPACT_STATUSES)}
COMPACT_MODULE_CODES = {module: code for code, module in enumerate(COMPACT_MODULES)}
COMPACT_MIN_US = to_epoch_us(dt.datetime.min.replace(tzinfo=dt.UTC))
COMPACT_MAX_US = to_epoch_us(dt.datetime.max.replace(tzinfo=dt.UTC))
COMPACT_MAX_ORDINAL = dt.date.max.toordinal()


def pack_compact(
    sha256: str,
    *,
    seen_at_us: int,
    size_bytes: int,
    document_date: int,
    status: int,
    module: int,
    strings: tuple[str | None, str | None, str | None],
) -> bytes | None:
    """The compact form of a document record from its parts, or None when it has none.

    ``strings`` are remote_id, condominium_id and held_by. Empty strings, NUL bytes and sizes
    beyond 64 bits have no compact form: such records keep the JSON form.
    """
    if len(sha256) != 64 or not 0 <= size_bytes < 2**64:
        return None
    tail = b""
    for text in strings:
        if text is not None:
            if not text or "\0" in text:
                return None
            tail += text.encode()
        tail += b"\0"
    try:
        raw_sha = bytes.fromhex(sha256)
    except ValueError:
        return None
    if raw_sha.hex() != sha256:
        return None  # upper-case hex would not come back as written
    head = (COMPACT_FORM, raw_sha, seen_at_us, size_bytes, document_date, status, module)
    return COMPACT_HEAD.pack(*head) + tail


def compact_document(record: DocumentRecord) -> bytes | None:
    """The compact form of ``record``, or None when it keeps the JSON form."""
    status = COMPACT_STATUS_CODES.get(record.status)
    if status is None or record.document is not None or record.parked_reason is not None:
        return None
    return pack_compact(
        record.sha256,
        seen_at_us=to_epoch_us(record.seen_at),
        size_bytes=record.size_bytes,
        document_date=record.document_date.toordinal(),
        status=status,
        module=COMPACT_MODULE_CODES[record.module],
        strings=(record.remote_id, record.condominium_id, record.held_by),
    )


def compact_is_valid(value: bytes) -> bool:
    """Whether ``value`` is a well-formed compact document record (the key aside)."""
    if len(value) < COMPACT_HEAD.size + 3:
        return False
    form, seen_at, ordinal, status, module = COMPACT_FIELDS.unpack_from(value)
    tail = value[COMPACT_HEAD.size :]
    return (
        form == COMPACT_FORM
        and COMPACT_MIN_US <= seen_at <= COMPACT_MAX_US
        and 0 < ordinal <= COMPACT_MAX_ORDINAL
        and status < len(COMPACT_STATUSES)
        and module < len(COMPACT_MODULES)
        and tail.count(0) == 3
        and tail[-1] == 0
        and (tail.isascii() or is_utf8(tail))
    )


def unpack_compact(key: DocKey, value: bytes) -> DocumentRecord:
    """The document record of a valid compact ``value`` (see ``compact_is_valid``)."""
    _, sha, seen_at, size, ordinal, status, module = COMPACT_HEAD.unpack_from(value)
    remote_id, condominium_id, held_by, _ = value[COMPACT_HEAD.size :].decode().split("\0")
    # positional arguments, in DocumentRecord's field order: this runs for every view lookup
    return DocumentRecord(
        key,
        COMPACT_STATUSES[status],
        sha.hex(),
        COMPACT_MODULES[module],
        _EPOCH + dt.timedelta(microseconds=seen_at),
        dt.date.fromordinal(ordinal),
        size,
        remote_id or None,
        condominium_id or None,
        held_by or None,
    )


def is_utf8(value: bytes) -> bool:
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


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
        "document": None if record.document is None else record.document.model_dump(mode="json"),
    }
    return record.key.encode(), orjson.dumps(value)


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
