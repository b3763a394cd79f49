"""The published view of one partition: what the relay has published, held, parked or baselined.

The view changes only through ``apply(record)``, on restore and in live processing alike. It is
kept compact because one partition may hold a million documents: per building, a dict from
document id to 60-odd packed bytes (raw sha256, times as integers, module and status as codes,
condominium and snapshot ids as indexes into a shared string table, remote id as the tail).
Records that carry a full document (parked) are kept as they are. Lookups rebuild the record.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Container, Iterable, Iterator, Mapping
from typing import NamedTuple

import orjson

from consumer.core.events import Module
from consumer.core.state import (
    SCHEMA_VERSION,
    AgencyKey,
    AgencyRecord,
    BuildingKey,
    BuildingRecord,
    DocKey,
    DocStatus,
    DocumentRecord,
    StateRecord,
    decode_state,
    from_epoch_us,
    to_epoch_us,
)

# sha256, seen_at (µs), size, document date (ordinal), status, module, condominium, held_by;
# the remote id follows as UTF-8. An absent string index is _NONE.
_PACK = struct.Struct("<32sqqIBBII")
_SEEN_AT = struct.Struct("<q")
_SEEN_AT_AT = 32
_STATUS_AT = 52
_MODULE_AT = 53
_NONE = 0xFFFFFFFF
_EPOCH = from_epoch_us(0)
_STATUSES = tuple(DocStatus)
_STATUS_CODES = {status: code for code, status in enumerate(_STATUSES)}
_STATUS_BY_VALUE = {status.value: status for status in _STATUSES}
_MODULES = tuple(Module)
_MODULE_BY_VALUE = {module.value: module for module in _MODULES}
_MODULE_CODES = {module: code for code, module in enumerate(_MODULES)}
_TRACKED = (DocStatus.PARKED, DocStatus.UPLOADING, DocStatus.DELETE_HELD)
ON_PARTNER = frozenset({DocStatus.PUBLISHED, DocStatus.DELETE_HELD})
"""Statuses of documents the relay published and the partner holds."""

_Stored = bytes | DocumentRecord


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
        self.on_partner: dict[Module, int] = {}


class PublishedView:
    """The compacted view of one partition, rebuilt from (and kept in step with) the changelog."""

    def __init__(self) -> None:
        self._buildings: dict[tuple[str, str], _Building] = {}
        self._strings: list[str] = []
        self._string_ids: dict[str, int] = {}
        self._counts = dict.fromkeys(DocStatus, 0)
        self._tracked: dict[DocStatus, dict[DocKey, None]] = {s: {} for s in _TRACKED}
        self._agencies: dict[str, AgencyRecord] = {}

    # -- changes ---------------------------------------------------------------------------------
    def apply(self, record: StateRecord) -> None:
        """Apply one state record; the only way the view changes."""
        if isinstance(record, DocumentRecord):
            self._put(record)
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
        """Apply a changelog record from its bytes: ``apply(decode_state(key, value))``, faster.

        The restore path. Plain document records (the vast majority) are packed straight from
        the JSON; anything else, or anything unexpected, goes through ``decode_state``, which
        raises the precise error.
        """
        if value is None or not self._restore_document(key, value):
            self.apply(decode_state(key, value))

    def _restore_document(self, key: bytes, value: bytes) -> bool:
        try:
            data = orjson.loads(value)
            if (
                data["kind"] != "document"
                or data["schema_version"] != SCHEMA_VERSION
                or data["document"] is not None
                or data["parked_reason"] is not None
            ):
                return False
            agency_id, building_id, document_id = key.decode().split(":", 2)
            status = _STATUS_BY_VALUE[data["status"]]
            module = _MODULE_BY_VALUE[data["module"]]
            sha = data["sha256"]
            size = data["size_bytes"]
            remote_id = data["remote_id"]
            seen_at = dt.datetime.fromisoformat(data["seen_at"])
            if (
                not (agency_id and building_id and document_id)
                or status in self._tracked
                or type(size) is not int
                or not 0 <= size < 2**63
                or len(sha) != 64
                or seen_at.tzinfo is None
                or (remote_id is not None and (type(remote_id) is not str or not remote_id))
            ):
                return False
            raw_sha = bytes.fromhex(sha)
            if raw_sha.hex() != sha:
                return False
            packed = _PACK.pack(
                raw_sha,
                to_epoch_us(seen_at),
                size,
                dt.date.fromisoformat(data["document_date"]).toordinal(),
                _STATUS_CODES[status],
                _MODULE_CODES[module],
                self._intern(_optional_text(data["condominium_id"])),
                self._intern(_optional_text(data["held_by"])),
            )
        except (KeyError, TypeError, ValueError, AttributeError, orjson.JSONDecodeError):
            return False
        building = self._building_for(agency_id, building_id)
        old = building.docs.get(document_id)
        if old is not None:
            self._uncount(building, DocKey(agency_id, building_id, document_id), old)
        building.docs[document_id] = packed if remote_id is None else packed + remote_id.encode()
        self._counts[status] += 1
        if status in ON_PARTNER:
            building.on_partner[module] = building.on_partner.get(module, 0) + 1
        return True

    def _put(self, record: DocumentRecord) -> None:
        key = record.key
        building = self._building_for(key.agency_id, key.building_id)
        old = building.docs.get(key.document_id)
        if old is not None:
            self._uncount(building, key, old)
        building.docs[key.document_id] = self._pack(record) or record
        self._counts[record.status] += 1
        if record.status in ON_PARTNER:
            counts = building.on_partner
            counts[record.module] = counts.get(record.module, 0) + 1
        tracked = self._tracked.get(record.status)
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
        return self._unpack(key, stored)

    def brief(self, key: DocKey) -> DocumentBrief | None:
        """Status, sha256 and seen_at of one document: cheaper than ``document``."""
        building = self._buildings.get((key.agency_id, key.building_id))
        stored = None if building is None else building.docs.get(key.document_id)
        if stored is None:
            return None
        if isinstance(stored, DocumentRecord):
            return DocumentBrief(stored.status, stored.sha256, to_epoch_us(stored.seen_at))
        sha, seen_at_us = stored[:32].hex(), _SEEN_AT.unpack_from(stored, _SEEN_AT_AT)[0]
        return DocumentBrief(_STATUSES[stored[_STATUS_AT]], sha, seen_at_us)

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
            yield self._unpack(DocKey(agency_id, building_id, document_id), stored)

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
                seen_at_us = _SEEN_AT.unpack_from(stored, _SEEN_AT_AT)[0]
                module = _MODULES[stored[_MODULE_AT]]
            if seen_at_us < before_us and module in modules:
                key = DocKey(building.agency_id, building.building_id, document_id)
                yield self._unpack(key, stored)

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
        return sum(building.on_partner.get(module, 0) for module in set(modules))

    # -- packing ---------------------------------------------------------------------------------
    def _intern(self, value: str | None) -> int:
        if value is None:
            return _NONE
        index = self._string_ids.get(value)
        if index is None:
            index = self._string_ids[value] = len(self._strings)
            self._strings.append(value)
        return index

    def _pack(self, record: DocumentRecord) -> bytes | None:
        if record.document is not None or record.parked_reason is not None:
            return None
        if not 0 <= record.size_bytes < 2**63 or record.remote_id == "":
            return None  # rare shapes are kept as they are rather than packed ambiguously
        packed = _PACK.pack(
            bytes.fromhex(record.sha256),
            to_epoch_us(record.seen_at),
            record.size_bytes,
            record.document_date.toordinal(),
            _STATUS_CODES[record.status],
            _MODULE_CODES[record.module],
            self._intern(record.condominium_id),
            self._intern(record.held_by),
        )
        return packed if record.remote_id is None else packed + record.remote_id.encode()

    def _unpack(self, key: DocKey, stored: _Stored) -> DocumentRecord:
        if isinstance(stored, DocumentRecord):
            return stored
        sha, seen_at, size, ordinal, status, module, condominium, held_by = _PACK.unpack_from(
            stored
        )
        strings = self._strings
        # positional arguments, in DocumentRecord's field order: this runs for every lookup
        return DocumentRecord(
            key,
            _STATUSES[status],
            sha.hex(),
            _MODULES[module],
            _EPOCH + dt.timedelta(microseconds=seen_at),
            dt.date.fromordinal(ordinal),
            size,
            stored[_PACK.size :].decode() if len(stored) > _PACK.size else None,
            None if condominium == _NONE else strings[condominium],
            None if held_by == _NONE else strings[held_by],
        )


def _optional_text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError("expected a string or null")


def _status_module(stored: _Stored) -> tuple[DocStatus, Module]:
    if isinstance(stored, DocumentRecord):
        return stored.status, stored.module
    return _STATUSES[stored[_STATUS_AT]], _MODULES[stored[_MODULE_AT]]
