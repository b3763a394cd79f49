"""Assembly of manifest snapshots from their parts, for one input partition.

A snapshot is acted on only when every part ``1..parts`` of one ``snapshot_id`` of one building
arrived and the items add up to ``item_count``; anything else is dropped without effect and
reported (an item count mismatch, parts that disagree, a snapshot too large to hold, one with a
dead-lettered part, an expired or evicted snapshot). Snapshots are told apart by agency, building
and id, so that an id LSC reuses for two buildings costs neither its manifest. A snapshot whose
modules are all covered by a newer one of the same building is superseded: waiting for it is
pointless. Every input offset comes back either in a ``CompleteManifest`` (done once its work is
done) or as released (done now). Time is passed in: the assembler never reads a clock.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import chain

from consumer.core.events import Document, ManifestSnapshot, Module
from consumer.core.state import to_epoch_us


class AssemblyOutcome(StrEnum):
    PENDING = "pending"  # part kept, snapshot not complete yet
    COMPLETE = "complete"
    DUPLICATE = "duplicate"  # part already received, or snapshot already complete
    SUPERSEDED = "superseded"  # a newer snapshot covers the same modules
    EVICTED = "evicted"  # dropped to stay within max_pending_items
    INVALID_COUNT = "invalid_count"  # items do not add up to item_count
    INCONSISTENT = "inconsistent"  # parts of one snapshot disagree, or part > parts
    TOO_LARGE = "too_large"  # declares more items than max_pending_items: can never be assembled
    ABANDONED = "abandoned"  # a part of the snapshot was dead-lettered: it can never complete
    EXPIRED = "expired"  # incomplete past the expiry


@dataclass(frozen=True, slots=True)
class CompleteManifest:
    """All parts of one snapshot; its offsets are done only when its work is done."""

    agency_id: str
    building_id: str
    snapshot_id: str
    taken_at: dt.datetime
    modules: frozenset[Module]
    items: tuple[Document, ...]
    offsets: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DroppedSnapshot:
    """A snapshot given up without acting on it; its offsets are released."""

    agency_id: str
    building_id: str
    snapshot_id: str
    taken_at: dt.datetime
    reason: AssemblyOutcome
    parts_received: int
    parts: int
    offsets: tuple[int, ...]


ExpiredSnapshot = DroppedSnapshot  # what ``expire`` returns, with reason ``expired``


@dataclass(slots=True)
class AssemblyResult:
    """What one part did: its ``outcome``, a manifest ready to plan, and offsets now done."""

    outcome: AssemblyOutcome
    complete: CompleteManifest | None = None
    released: list[int] = field(default_factory=list)
    dropped: list[DroppedSnapshot] = field(default_factory=list)


_MAX_ABANDONED = 10_000

SnapshotKey = tuple[str, str, str]
"""Agency, building and snapshot id: what tells one snapshot from another."""


def _key(part: ManifestSnapshot) -> SnapshotKey:
    return (part.agency_id, part.building_id, part.snapshot_id)


class _Pending:
    __slots__ = ("arrived_us", "count", "first", "offsets", "parts_items", "taken_us")

    def __init__(self, first: ManifestSnapshot, arrived_us: int) -> None:
        self.first = first  # the header every later part must agree with
        self.taken_us = to_epoch_us(first.taken_at)
        self.arrived_us = arrived_us
        self.parts_items: dict[int, tuple[Document, ...]] = {}
        self.offsets: list[int] = []
        self.count = 0

    def agrees(self, part: ManifestSnapshot) -> bool:
        """Same header, and the same items when the part was read already (a redelivery)."""
        first = self.first
        kept = self.parts_items.get(part.part)
        return (
            (part.parts, part.item_count) == (first.parts, first.item_count)
            and to_epoch_us(part.taken_at) == self.taken_us
            and set(part.modules) == set(first.modules)
            and (kept is None or kept == part.items)
        )


class ManifestAssembler:
    """Gathers the parts of the snapshots of one partition until each is complete or given up."""

    def __init__(self, *, expiry: dt.timedelta, max_pending_items: int) -> None:
        self._expiry_us = expiry // dt.timedelta(microseconds=1)
        self._max_pending_items = max_pending_items
        self._pending: dict[SnapshotKey, _Pending] = {}  # in order of first arrival
        self._by_place: dict[tuple[str, str], dict[str, _Pending]] = {}
        self._pending_items = 0
        # per building and module: taken_at and snapshot id of the newest complete snapshot
        self._completed: dict[tuple[str, str], dict[Module, tuple[int, str]]] = {}
        # snapshots with a dead-lettered part, and when: their later parts are turned away
        self._abandoned: dict[SnapshotKey, int] = {}

    def add(self, part: ManifestSnapshot, *, offset: int, now: dt.datetime) -> AssemblyResult:
        """Take one part read at ``offset``; ``now`` is when it was published (its record's time),
        from which its snapshot's expiry counts, even when the part is read again after a restart.
        """
        admitted = self._admit(part, offset=offset, now=now)
        if isinstance(admitted, AssemblyResult):
            return admitted
        pending = admitted
        pending.parts_items[part.part] = part.items
        pending.offsets.append(offset)
        pending.count += len(part.items)
        self._pending_items += len(part.items)
        result = AssemblyResult(AssemblyOutcome.PENDING)
        complete = len(pending.parts_items) == part.parts
        if pending.count > part.item_count or (complete and pending.count != part.item_count):
            result.outcome = AssemblyOutcome.INVALID_COUNT
            self._drop(_key(part), AssemblyOutcome.INVALID_COUNT, result)
            return result
        if complete:
            result.outcome = AssemblyOutcome.COMPLETE
            result.complete = self._complete(_key(part))
        self._sweep((part.agency_id, part.building_id), result)
        self._evict(_key(part), result)
        return result

    def _admit(
        self, part: ManifestSnapshot, *, offset: int, now: dt.datetime
    ) -> _Pending | AssemblyResult:
        """The pending snapshot this part belongs to, or the result that turns it away."""
        snapshot_id = part.snapshot_id
        place = (part.agency_id, part.building_id)
        pending = self._pending.get(_key(part))
        if pending is not None and not pending.agrees(part):
            result = AssemblyResult(AssemblyOutcome.INCONSISTENT, released=[offset])
            self._drop(_key(part), AssemblyOutcome.INCONSISTENT, result)
            return result
        if part.part > part.parts:
            outcome = AssemblyOutcome.INCONSISTENT
        elif part.item_count > self._max_pending_items:
            # Waiting for it would only evict other buildings' snapshots, then itself.
            outcome = AssemblyOutcome.TOO_LARGE
        elif pending is not None:
            if part.part not in pending.parts_items:
                return pending
            outcome = AssemblyOutcome.DUPLICATE
        elif _key(part) in self._abandoned:
            outcome = AssemblyOutcome.ABANDONED
        elif (to_epoch_us(part.taken_at), snapshot_id) in self._completed.get(place, {}).values():
            # an id used again for another snapshot (another taken_at) is no duplicate
            outcome = AssemblyOutcome.DUPLICATE
        elif self._covered(place, to_epoch_us(part.taken_at), part.modules, ignore=snapshot_id):
            outcome = AssemblyOutcome.SUPERSEDED
        else:
            pending = self._pending[_key(part)] = _Pending(part, to_epoch_us(now))
            self._by_place.setdefault(place, {})[snapshot_id] = pending
            return pending
        return AssemblyResult(outcome, released=[offset])

    def expire(self, now: dt.datetime) -> list[DroppedSnapshot]:
        """Drop the incomplete snapshots whose first part was published ``expiry`` or more ago."""
        deadline = to_epoch_us(now) - self._expiry_us
        result = AssemblyResult(AssemblyOutcome.EXPIRED)
        for key, pending in list(self._pending.items()):
            if pending.arrived_us <= deadline:
                self._drop(key, AssemblyOutcome.EXPIRED, result)
        for key, abandoned_us in list(self._abandoned.items()):
            if abandoned_us <= deadline:
                del self._abandoned[key]
        return result.dropped

    def abandon(self, key: SnapshotKey, *, now: dt.datetime) -> AssemblyResult:
        """A part of snapshot ``key`` was dead-lettered: drop the parts that arrived (their offsets
        are released) and turn later ones away until the expiry, instead of holding them for it.
        """
        result = AssemblyResult(AssemblyOutcome.ABANDONED)
        if key in self._pending:
            self._drop(key, AssemblyOutcome.ABANDONED, result)
        self._abandoned[key] = to_epoch_us(now)
        while len(self._abandoned) > _MAX_ABANDONED:  # a flood of poison stays bounded
            del self._abandoned[next(iter(self._abandoned))]
        return result

    def pending_offsets(self) -> list[int]:
        """Offsets held by incomplete snapshots, lowest first."""
        return sorted(chain.from_iterable(p.offsets for p in self._pending.values()))

    @property
    def pending_snapshots(self) -> int:
        return len(self._pending)

    @property
    def pending_items(self) -> int:
        return self._pending_items

    def _complete(self, key: SnapshotKey) -> CompleteManifest:
        pending = self._forget(key)
        first = pending.first
        snapshot_id = first.snapshot_id
        newest = self._completed.setdefault((first.agency_id, first.building_id), {})
        for module in first.modules:
            if newest.get(module, (-(2**63), ""))[0] <= pending.taken_us:
                newest[module] = (pending.taken_us, snapshot_id)
        return CompleteManifest(
            agency_id=first.agency_id,
            building_id=first.building_id,
            snapshot_id=snapshot_id,
            taken_at=first.taken_at,
            modules=frozenset(first.modules),
            items=tuple(
                chain.from_iterable(pending.parts_items[n] for n in sorted(pending.parts_items))
            ),
            offsets=tuple(pending.offsets),
        )

    def _covered(
        self, place: tuple[str, str], taken_us: int, modules: Iterable[Module], *, ignore: str
    ) -> bool:
        """Whether newer snapshots of the building cover every module of this one."""
        completed = self._completed.get(place, {})
        newer_pending = [
            p
            for sid, p in self._by_place.get(place, {}).items()
            if sid != ignore and p.taken_us > taken_us
        ]
        return all(
            completed.get(module, (-(2**63), ""))[0] >= taken_us
            or any(module in p.first.modules for p in newer_pending)
            for module in modules
        )

    def _sweep(self, place: tuple[str, str], result: AssemblyResult) -> None:
        for snapshot_id, pending in list(self._by_place.get(place, {}).items()):
            if self._covered(place, pending.taken_us, pending.first.modules, ignore=snapshot_id):
                self._drop((*place, snapshot_id), AssemblyOutcome.SUPERSEDED, result)

    def _evict(self, current: SnapshotKey, result: AssemblyResult) -> None:
        while self._pending_items > self._max_pending_items and self._pending:
            oldest = next(iter(self._pending))
            if oldest == current:
                result.outcome = AssemblyOutcome.EVICTED
            self._drop(oldest, AssemblyOutcome.EVICTED, result)

    def _forget(self, key: SnapshotKey) -> _Pending:
        pending = self._pending.pop(key)
        self._pending_items -= pending.count
        place = (pending.first.agency_id, pending.first.building_id)
        others = self._by_place[place]
        del others[pending.first.snapshot_id]
        if not others:
            del self._by_place[place]
        return pending

    def _drop(self, key: SnapshotKey, reason: AssemblyOutcome, result: AssemblyResult) -> None:
        pending = self._forget(key)
        first = pending.first
        result.released.extend(pending.offsets)
        result.dropped.append(
            DroppedSnapshot(
                agency_id=first.agency_id,
                building_id=first.building_id,
                snapshot_id=first.snapshot_id,
                taken_at=first.taken_at,
                reason=reason,
                parts_received=len(pending.parts_items),
                parts=first.parts,
                offsets=tuple(pending.offsets),
            )
        )
