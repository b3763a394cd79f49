"""The published view of one partition: what the relay has published, held, parked or baselined.

The view changes only through state records, on restore and in live processing alike. It is
kept compact because one partition may hold a million documents: per building, a dict from
document id to the record's compact form (about 70 bytes: raw sha256, times as integers, codes,
then the ids), which is also how the changelog carries it, so that restoring stores the bytes read.
Records that carry a full document (parked) are kept as they are. Lookups rebuild the record.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Container, Iterable, Iterator, Mapping
from typing import NamedTuple, Protocol

import orjson

from consumer.core.events import Module
from consumer.core.state import (
    AgencyKey,
    AgencyRecord,
    BuildingKey,
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
    COMPACT_SEEN_AT,
    COMPACT_SEEN_AT_AT,
    COMPACT_SHA_AT,
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
_TRACKED = (DocStatus.PARKED, DocStatus.UPLOADING, DocStatus.DELETE_HELD)
ON_PARTNER = frozenset({DocStatus.PUBLISHED, DocStatus.DELETE_HELD})
"""Statuses of documents the relay published and the partner holds."""
_PUBLISHED = COMPACT_STATUS_CODES[DocStatus.PUBLISHED]
# Statuses whose compact records restore stores directly; tracked ones take the general path.
_STORED_AS_READ = frozenset(
    code for status, code in COMPACT_STATUS_CODES.items() if status not in _TRACKED
)

_Stored = bytes | DocumentRecord


class EncodedRecord(Protocol):
    """A changelog record as read: what ``PublishedView.restore`` needs of a consumer record."""

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...


class DocumentBrief(NamedTuple):
    """The part of a record that decides most deltas, read without rebuilding the record."""

    status: DocStatus
    sha256: str
    seen_at_us: int  # microseconds since the epoch


class _Building:
    __slots__ = ("agency_id", "building_id", "docs", "on_partner", "record")

    def __init__(self, agency_id: str, building_id: str) -> None:
        self.agency_id = agency_id
        self.building_id = building_id
        self.docs: dict[str, _Stored] = {}
        self.record: BuildingRecord | None = None
        self.on_partner = [0] * len(COMPACT_MODULES)  # by module code


class PublishedView:
    """The compacted view of one partition, rebuilt from (and kept in step with) the changelog."""

    def __init__(self) -> None:
        self._buildings: dict[tuple[str, str], _Building] = {}
        self._counts = dict.fromkeys(DocStatus, 0)
        self._tracked: dict[DocStatus, dict[DocKey, None]] = {s: {} for s in _TRACKED}
        self._agencies: dict[str, AgencyRecord] = {}

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

    def restore(self, records: Iterable[EncodedRecord]) -> int:
        """Apply changelog records in order, as ``apply_encoded`` one by one; returns how many.

        The restore path. A compact document record (nearly every record of a changelog) is
        checked and its bytes are stored as they are; a JSON document record is packed straight
        from the JSON; anything else, or anything unexpected, goes through ``decode_state``,
        which raises the precise error.
        """
        applied = 0
        added = [0] * len(COMPACT_STATUSES)  # counted at the end: this loop runs for every record
        # Records of one building mostly come in a row: while keys start with the building's
        # b"agency:building:", only the document id is read.
        prefix, building = b"", _Building("", "")
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
            for record in records:
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
                    self._restore_other(key, value)
                    prefix = b""  # it may have dropped a building
                    continue
                docs = building.docs
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

    def _store(self, key: DocKey, stored: _Stored) -> None:
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

    def _remove(self, key: DocKey) -> None:
        place = (key.agency_id, key.building_id)
        building = self._buildings.get(place)
        if building is None:
            return
        old = building.docs.pop(key.document_id, None)
        if old is not None:
            self._uncount(building, key, old)
        self._drop_if_empty(place, building)

    def _uncount(self, building: _Building, key: DocKey, stored: _Stored) -> None:
        status, module = _status_module(stored)
        self._counts[status] -= 1
        if status in ON_PARTNER:
            building.on_partner[module] -= 1
        tracked = self._tracked.get(status)
        if tracked is not None:
            tracked.pop(key, None)

    def _building_for(self, agency_id: str, building_id: str) -> _Building:
        place = (agency_id, building_id)
        building = self._buildings.get(place)
        if building is None:
            building = self._buildings[place] = _Building(agency_id, building_id)
        return building

    def _drop_if_empty(self, place: tuple[str, str], building: _Building) -> None:
        if not building.docs and building.record is None:
            del self._buildings[place]

    # -- lookups ---------------------------------------------------------------------------------
    def document(self, key: DocKey) -> DocumentRecord | None:
        building = self._buildings.get((key.agency_id, key.building_id))
        if building is None:
            return None
        stored = building.docs.get(key.document_id)
        if stored is None:
            return None
        return _unpack(key, stored)

    def brief(self, key: DocKey) -> DocumentBrief | None:
        """Status, sha256 and seen_at of one document: cheaper than ``document``."""
        building = self._buildings.get((key.agency_id, key.building_id))
        stored = None if building is None else building.docs.get(key.document_id)
        if stored is None:
            return None
        if isinstance(stored, DocumentRecord):
            return DocumentBrief(stored.status, stored.sha256, to_epoch_us(stored.seen_at))
        seen_at_us = COMPACT_SEEN_AT.unpack_from(stored, COMPACT_SEEN_AT_AT)[0]
        sha = stored[COMPACT_SHA_AT : COMPACT_SHA_AT + 32].hex()
        return DocumentBrief(COMPACT_STATUSES[stored[COMPACT_STATUS_AT]], sha, seen_at_us)

    def agency(self, agency_id: str) -> AgencyRecord | None:
        """The operator's controls of one agency, as this partition knows them."""
        return self._agencies.get(agency_id)

    def paused_agencies(self) -> set[str]:
        return {agency for agency, record in self._agencies.items() if record.paused}

    def building(self, agency_id: str, building_id: str) -> BuildingRecord | None:
        building = self._buildings.get((agency_id, building_id))
        return None if building is None else building.record

    def buildings(self) -> Iterator[BuildingKey]:
        """Every building with documents or a building record."""
        for agency_id, building_id in list(self._buildings):
            yield BuildingKey(agency_id, building_id)

    def documents(self, agency_id: str, building_id: str) -> Iterator[DocumentRecord]:
        """Every document record of one building (a snapshot: applying meanwhile is safe)."""
        building = self._buildings.get((agency_id, building_id))
        if building is None:
            return
        agency_id, building_id = building.agency_id, building.building_id
        for document_id, stored in list(building.docs.items()):
            yield _unpack(DocKey(agency_id, building_id, document_id), stored)

    def seen_before(
        self,
        agency_id: str,
        building_id: str,
        before: dt.datetime,
        *,
        modules: Container[Module],
        excluding: Container[str],
    ) -> Iterator[DocumentRecord]:
        """Documents of ``modules`` seen before ``before`` and not in ``excluding``.

        What a manifest taken at ``before`` and listing ``excluding`` leaves out; only those
        records are rebuilt.
        """
        building = self._buildings.get((agency_id, building_id))
        if building is None:
            return
        before_us = to_epoch_us(before)
        for document_id, stored in list(building.docs.items()):
            if document_id in excluding:
                continue
            if isinstance(stored, DocumentRecord):
                seen_at_us, module = to_epoch_us(stored.seen_at), stored.module
            else:
                seen_at_us = COMPACT_SEEN_AT.unpack_from(stored, COMPACT_SEEN_AT_AT)[0]
                module = COMPACT_MODULES[stored[COMPACT_MODULE_AT]]
            if seen_at_us < before_us and module in modules:
                key = DocKey(building.agency_id, building.building_id, document_id)
                yield _unpack(key, stored)

    def with_status(self, status: DocStatus) -> Iterator[DocumentRecord]:
        """Every document with ``status``; parked, uploading and held ones without a scan."""
        tracked = self._tracked.get(status)
        if tracked is not None:
            for key in list(tracked):
                record = self.document(key)
                if record is not None:
                    yield record
            return
        for building in list(self._buildings.values()):
            for record in self.documents(building.agency_id, building.building_id):
                if record.status is status:
                    yield record

    def parked(self) -> Iterator[DocumentRecord]:
        return self.with_status(DocStatus.PARKED)

    def uploading(self) -> Iterator[DocumentRecord]:
        """Upload intents: after a restart, their outcome must be reconciled with the partner."""
        return self.with_status(DocStatus.UPLOADING)

    def held(self, agency_id: str, building_id: str) -> list[DocumentRecord]:
        """The withdrawals the mass-deletion guard holds for one building."""
        return [
            record
            for key in list(self._tracked[DocStatus.DELETE_HELD])
            if key.agency_id == agency_id
            and key.building_id == building_id
            and (record := self.document(key)) is not None
        ]

    def counts(self) -> Mapping[DocStatus, int]:
        return dict(self._counts)

    def count(self, status: DocStatus) -> int:
        return self._counts[status]

    @property
    def held_count(self) -> int:
        return self._counts[DocStatus.DELETE_HELD]

    @property
    def size(self) -> int:
        """Number of documents in the view."""
        return sum(self._counts.values())

    def published_count(self, agency_id: str, building_id: str, modules: Iterable[Module]) -> int:
        """Documents of these modules that the relay published and the partner holds."""
        building = self._buildings.get((agency_id, building_id))
        if building is None:
            return 0
        on_partner = building.on_partner
        return sum(on_partner[COMPACT_MODULE_CODES[module]] for module in set(modules))


class _Encoded(NamedTuple):
    key: bytes
    value: bytes | None


def _unpack(key: DocKey, stored: _Stored) -> DocumentRecord:
    return stored if isinstance(stored, DocumentRecord) else unpack_compact(key, stored)


def _optional_text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError("expected a string or null")


def _status_module(stored: _Stored) -> tuple[DocStatus, int]:
    """Status and module code of a stored document."""
    if isinstance(stored, DocumentRecord):
        return stored.status, COMPACT_MODULE_CODES[stored.module]
    return COMPACT_STATUSES[stored[COMPACT_STATUS_AT]], stored[COMPACT_MODULE_AT]
