"""The packed storage of a published view, and the only ways it changes: apply and restore.

One partition may hold a million documents, so per building a dict maps each document id to the
record's compact form (``state_compact``), which is also how the changelog carries it: restoring
stores the bytes read, a whole fetch at a time. Records that carry a full document (parked) are
kept as they are. The queries are ``PublishedView``'s, which adds them to this storage.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol

import orjson

from consumer.core.events import Module
from consumer.core.state import (
    ON_PARTNER,
    AgencyKey,
    AgencyRecord,
    BuildingRecord,
    DocKey,
    DocStatus,
    DocumentRecord,
    StateDecodeError,
    StateRecord,
    decode_key,
    to_epoch_us,
)
from consumer.core.state_codec import SCHEMA_VERSION, decode_state
from consumer.core.state_compact import (
    COMPACT_FIELDS,
    COMPACT_FORM,
    COMPACT_HEAD,
    COMPACT_MAX_ORDINAL,
    COMPACT_MAX_US,
    COMPACT_MIN_US,
    COMPACT_MODULE_AT,
    COMPACT_MODULE_CODES,
    COMPACT_MODULES,
    COMPACT_STATUS_AT,
    COMPACT_STATUS_CODES,
    COMPACT_STATUSES,
    compact_document,
    is_utf8,
    pack_compact,
    unpack_compact,
)

_STATUS_BY_VALUE = {status.value: status for status in DocStatus}
_MODULE_BY_VALUE = {module.value: module for module in Module}
_TRACKED = (DocStatus.PARKED, DocStatus.UPLOADING, DocStatus.DELETE_HELD, DocStatus.UPLOAD_HELD)
_PUBLISHED = COMPACT_STATUS_CODES[DocStatus.PUBLISHED]
# Statuses whose compact records restore stores directly; tracked ones take the general path.
_STORED_AS_READ = frozenset(
    code for status, code in COMPACT_STATUS_CODES.items() if status not in _TRACKED
)

Stored = bytes | DocumentRecord


class EncodedRecord(Protocol):
    """A changelog record as read: what ``PublishedView.restore`` needs of a consumer record."""

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...


class PackedBuilding:
    """One building's documents (packed), its building record and its counts on the partner."""

    __slots__ = ("agency_id", "building_id", "docs", "on_partner", "record")

    def __init__(self, agency_id: str, building_id: str) -> None:
        self.agency_id = agency_id
        self.building_id = building_id
        self.docs: dict[str, Stored] = {}
        self.record: BuildingRecord | None = None
        self.on_partner = [0] * len(COMPACT_MODULES)  # by module code


Unreadable = Callable[[int, StateDecodeError], None]


def _refuse(index: int, error: StateDecodeError) -> None:
    raise error


class ViewStorage:
    """The documents, buildings and agency controls of one partition; changed only by records."""

    def __init__(self) -> None:
        self._buildings: dict[tuple[str, str], PackedBuilding] = {}
        self._counts = dict.fromkeys(DocStatus, 0)
        self._tracked: dict[DocStatus, dict[DocKey, None]] = {s: {} for s in _TRACKED}
        self._agencies: dict[str, AgencyRecord] = {}
        # Documents whose newest state record could not be read, or whose create is in doubt:
        # their state is unknown, so an upload of one looks it up on the partner first.
        self._unknown: set[DocKey] = set()
        # Documents that owe late-copy checks (their records keep the JSON form): few, and only
        # for minutes, so kept by key rather than found by a scan.
        self._late_checks: dict[DocKey, None] = {}

    # -- changes ---------------------------------------------------------------------------------
    def apply(self, record: StateRecord) -> None:
        """Apply one state record; the only way the view changes."""
        if isinstance(record, DocumentRecord):
            self._store(record.key, compact_document(record) or record)
        elif isinstance(record, BuildingRecord):
            self._building_for(record.agency_id, record.building_id).record = record
        elif isinstance(record, AgencyRecord):
            self._agencies[record.agency_id] = record
        elif isinstance(record.key, AgencyKey):
            self._agencies.pop(record.key.agency_id, None)
        elif isinstance(record.key, DocKey):
            self._remove(record.key)
        else:
            place = (record.key.agency_id, record.key.building_id)
            building = self._buildings.get(place)
            if building is not None:
                building.record = None
                self._drop_if_empty(place, building)

    def apply_encoded(self, key: bytes, value: bytes | None) -> None:
        """Apply a changelog record from its bytes: ``apply(decode_state(key, value))``, faster."""
        self.restore((_Encoded(key, value),))

    def restore(self, records: Iterable[EncodedRecord], on_unreadable: Unreadable = _refuse) -> int:
        """Apply changelog records in order, as ``apply_encoded`` one by one; returns how many.

        The restore path. A compact document record (nearly every record of a changelog) is
        checked and its bytes are stored as they are; a JSON document record is packed straight
        from the JSON; anything else, or anything unexpected, goes through ``decode_state``,
        which raises the precise error. With ``on_unreadable``, a record that cannot be read is
        passed to it (by its index in ``records``) instead, and what it named becomes unknown
        (``forget_unreadable``); a later readable record or tombstone of the same key wins.
        """
        applied = 0
        added = [0] * len(COMPACT_STATUSES)  # counted at the end: this loop runs for every record
        # Records of one building mostly come in a row: while keys start with the building's
        # b"agency:building:", only the document id is read.
        prefix, building = b"", PackedBuilding("", "")
        # compact_is_valid's checks, inlined on locals for the same reason; a property test holds
        # the two equal on damaged records.
        fields, tail_at, stored_as_read, modules = (
            COMPACT_FIELDS,
            COMPACT_HEAD.size,
            _STORED_AS_READ,
            len(COMPACT_MODULES),
        )
        min_us, max_us, max_ordinal = COMPACT_MIN_US, COMPACT_MAX_US, COMPACT_MAX_ORDINAL
        try:
            for index, record in enumerate(records):
                key, value = record.key, record.value
                raw, data = key or b"", value or b""
                applied += 1
                try:
                    form, seen_at, ordinal, status, module = fields.unpack_from(data)
                    tail = data[tail_at:]
                    fast = (
                        form == COMPACT_FORM
                        and status in stored_as_read
                        and module < modules
                        and min_us <= seen_at <= max_us
                        and 0 < ordinal <= max_ordinal
                        and tail.count(0) == 3
                        and tail[-1] == 0
                        and (tail.isascii() or is_utf8(tail))
                    )
                    if fast and prefix and raw.startswith(prefix):
                        document_id = raw[len(prefix) :].decode()
                        fast = document_id != ""
                    elif fast:
                        agency_id, building_id, document_id = raw.decode().split(":", 2)
                        fast = agency_id != "" and building_id != "" and document_id != ""
                        if fast:
                            building = self._building_for(agency_id, building_id)
                            prefix = f"{agency_id}:{building_id}:".encode()
                except (ValueError, struct.error):  # not a compact value, or not a document key
                    fast = False
                if not fast:
                    prefix = b""  # it may have dropped a building
                    try:
                        self._restore_other(key, value)
                    except StateDecodeError as error:
                        on_unreadable(index, error)  # raises, unless skipping is wanted
                        self.forget_unreadable(key)
                        applied -= 1
                    continue
                docs = building.docs
                if self._unknown:
                    self._unknown.discard(
                        DocKey(building.agency_id, building.building_id, document_id)
                    )
                old = docs.setdefault(document_id, data)
                if old is not data:
                    place = building.agency_id, building.building_id
                    self._uncount(building, DocKey(*place, document_id), old)
                    docs[document_id] = data
                added[status] += 1
                if status == _PUBLISHED:
                    building.on_partner[module] += 1
        finally:
            for code, count in enumerate(added):
                self._counts[COMPACT_STATUSES[code]] += count
        return applied

    def forget_unreadable(self, key: bytes | None) -> None:
        """An unreadable record replaced whatever its key held: forget that, and remember a
        document as unknown. A key that names nothing readable changes nothing."""
        try:
            named = decode_key(key) if key is not None else None
        except StateDecodeError:
            return
        if isinstance(named, DocKey):
            self._remove(named)
            self._unknown.add(named)
        elif isinstance(named, AgencyKey):
            self._agencies.pop(named.agency_id, None)
        elif named is not None:
            building = self._buildings.get((named.agency_id, named.building_id))
            if building is not None:
                building.record = None
                self._drop_if_empty((named.agency_id, named.building_id), building)

    def doubt(self, key: DocKey) -> None:
        """The partner may hold ``key`` although no record says so (a create a stopped relay
        sent, which a lookup did not find yet): it becomes unknown until a record of it is
        applied, so that its next upload looks it up first."""
        self._unknown.add(key)

    def is_unknown(self, key: DocKey) -> bool:
        """Whether ``key``'s newest state record was unreadable, or a create of it is in doubt
        (``doubt``), and nothing readable came since."""
        return key in self._unknown

    def _restore_other(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            raise StateDecodeError("a changelog record has no key")
        doc_key = decode_key(key)
        packed = None if value is None else self._pack_json(value)
        if packed is None or not isinstance(doc_key, DocKey):
            self.apply(decode_state(key, value))
        else:
            self._store(doc_key, packed)

    @staticmethod
    def _pack_json(value: bytes) -> bytes | None:
        """The compact form of a plain JSON document record, or None to take the slow path."""
        try:
            data = orjson.loads(value)
            if (
                data["kind"] != "document"
                or data["schema_version"] != SCHEMA_VERSION
                or data["document"] is not None
                or data["parked_reason"] is not None
                or data.get("late_copy_checks") is not None
            ):
                return None
            status = COMPACT_STATUS_CODES[_STATUS_BY_VALUE[data["status"]]]
            size = data["size_bytes"]
            seen_at = dt.datetime.fromisoformat(data["seen_at"])
            if status not in _STORED_AS_READ or type(size) is not int or seen_at.tzinfo is None:
                return None
            return pack_compact(
                data["sha256"],
                seen_at_us=to_epoch_us(seen_at),
                size_bytes=size,
                document_date=dt.date.fromisoformat(data["document_date"]).toordinal(),
                status=status,
                module=COMPACT_MODULE_CODES[_MODULE_BY_VALUE[data["module"]]],
                strings=(
                    _optional_text(data["remote_id"]),
                    _optional_text(data["condominium_id"]),
                    _optional_text(data["held_by"]),
                ),
            )
        except (KeyError, TypeError, ValueError, AttributeError, orjson.JSONDecodeError):
            return None

    def _store(self, key: DocKey, stored: Stored) -> None:
        if self._unknown:
            self._unknown.discard(key)  # a readable record says what it is now
        building = self._building_for(key.agency_id, key.building_id)
        old = building.docs.get(key.document_id)
        if old is not None:
            self._uncount(building, key, old)
        building.docs[key.document_id] = stored
        status, module = _status_module(stored)
        self._counts[status] += 1
        if status in ON_PARTNER:
            building.on_partner[module] += 1
        tracked = self._tracked.get(status)
        if tracked is not None:
            tracked[key] = None
        if isinstance(stored, DocumentRecord) and stored.late_copy_checks is not None:
            self._late_checks[key] = None

    def _remove(self, key: DocKey) -> None:
        if self._unknown:
            self._unknown.discard(key)
        place = (key.agency_id, key.building_id)
        building = self._buildings.get(place)
        if building is None:
            return
        old = building.docs.pop(key.document_id, None)
        if old is not None:
            self._uncount(building, key, old)
        self._drop_if_empty(place, building)

    def _uncount(self, building: PackedBuilding, key: DocKey, stored: Stored) -> None:
        status, module = _status_module(stored)
        self._counts[status] -= 1
        if status in ON_PARTNER:
            building.on_partner[module] -= 1
        tracked = self._tracked.get(status)
        if tracked is not None:
            tracked.pop(key, None)
        if self._late_checks:
            self._late_checks.pop(key, None)

    def _building_for(self, agency_id: str, building_id: str) -> PackedBuilding:
        place = (agency_id, building_id)
        building = self._buildings.get(place)
        if building is None:
            building = self._buildings[place] = PackedBuilding(agency_id, building_id)
        return building

    def _drop_if_empty(self, place: tuple[str, str], building: PackedBuilding) -> None:
        if not building.docs and building.record is None:
            del self._buildings[place]


class _Encoded(NamedTuple):
    key: bytes
    value: bytes | None


def unpack_stored(key: DocKey, stored: Stored) -> DocumentRecord:
    """The record of a stored document: rebuilt from its packed form, or kept as it is."""
    return stored if isinstance(stored, DocumentRecord) else unpack_compact(key, stored)


def _optional_text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError("expected a string or null")


def _status_module(stored: Stored) -> tuple[DocStatus, int]:
    """Status and module code of a stored document."""
    if isinstance(stored, DocumentRecord):
        return stored.status, COMPACT_MODULE_CODES[stored.module]
    return COMPACT_STATUSES[stored[COMPACT_STATUS_AT]], stored[COMPACT_MODULE_AT]
