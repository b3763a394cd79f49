"""The published view of one partition: what the relay has published, held, parked or baselined.

The view changes only through state records, on restore and in live processing alike (its
storage, ``view_storage``); this module is what the rest of the relay asks of it. Lookups
rebuild a record from its packed form; ``brief`` and ``seen_before`` read only the fields they
need, since the manifest planner asks them for every item.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Container, Iterable, Iterator, Mapping
from typing import NamedTuple

from consumer.core.events import Module
from consumer.core.state import (
    AgencyRecord,
    BuildingKey,
    BuildingRecord,
    DocKey,
    DocStatus,
    DocumentRecord,
    to_epoch_us,
)
from consumer.core.state_compact import (
    COMPACT_MODULE_AT,
    COMPACT_MODULE_CODES,
    COMPACT_MODULES,
    COMPACT_SEEN_AT,
    COMPACT_SEEN_AT_AT,
    COMPACT_SHA_AT,
    COMPACT_STATUS_AT,
    COMPACT_STATUSES,
)
from consumer.core.view_storage import ViewStorage, unpack_stored


class DocumentBrief(NamedTuple):
    """The part of a record that decides most deltas, read without rebuilding the record."""

    status: DocStatus
    sha256: str
    seen_at_us: int  # microseconds since the epoch


class PublishedView(ViewStorage):
    """The compacted view of one partition, rebuilt from (and kept in step with) the changelog."""

    # -- lookups ---------------------------------------------------------------------------------
    def document(self, key: DocKey) -> DocumentRecord | None:
        building = self._buildings.get((key.agency_id, key.building_id))
        if building is None:
            return None
        stored = building.docs.get(key.document_id)
        if stored is None:
            return None
        return unpack_stored(key, stored)

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

    def backfill_paused_agencies(self) -> set[str]:
        """Agencies whose first publication alone an operator paused (live documents go on)."""
        return {agency for agency, record in self._agencies.items() if record.backfill_paused}

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
            yield unpack_stored(DocKey(agency_id, building_id, document_id), stored)

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
                yield unpack_stored(key, stored)

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

    def late_copy_checks(self) -> Iterator[DocumentRecord]:
        """Documents that owe late-copy checks (``DocumentRecord.late_copy_checks``): what a
        restarted relay schedules again."""
        for key in list(self._late_checks):
            record = self.document(key)
            if record is not None:
                yield record

    def parked(self) -> Iterator[DocumentRecord]:
        return self.with_status(DocStatus.PARKED)

    def uploading(self) -> Iterator[DocumentRecord]:
        """Upload intents: after a restart, their outcome must be reconciled with the partner."""
        return self.with_status(DocStatus.UPLOADING)

    def held(self, agency_id: str, building_id: str) -> list[DocumentRecord]:
        """What waits for the decision on one building's held manifest: its withdrawals
        (``delete_held``) and its uploads (``upload_held``)."""
        return [
            record
            for status in (DocStatus.DELETE_HELD, DocStatus.UPLOAD_HELD)
            for key in list(self._tracked[status])
            if key.agency_id == agency_id
            and key.building_id == building_id
            and (record := self.document(key)) is not None
        ]

    def waiting(self) -> Iterator[DocumentRecord]:
        """Every document that waits for a decision on a held manifest, of every building."""
        for status in (DocStatus.DELETE_HELD, DocStatus.UPLOAD_HELD):
            yield from self.with_status(status)

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

    def on_partner_by_agency(self) -> dict[str, int]:
        """Documents the partner holds from the relay, by agency, counted without a scan."""
        found: dict[str, int] = {}
        for (agency_id, _), building in list(self._buildings.items()):
            found[agency_id] = found.get(agency_id, 0) + sum(building.on_partner)
        return found

    def published_count(self, agency_id: str, building_id: str, modules: Iterable[Module]) -> int:
        """Documents of these modules that the relay published and the partner holds."""
        building = self._buildings.get((agency_id, building_id))
        if building is None:
            return 0
        on_partner = building.on_partner
        return sum(on_partner[COMPACT_MODULE_CODES[module]] for module in set(modules))
