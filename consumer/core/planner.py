"""Delta planning: the partner operations and state records one event causes.

Pure functions of the published view, the routing table and the event. Time comes from the
events: a document carries ``seen_at``; a manifest withdraws only documents seen before its
``taken_at``; a document-created event at or before the newest manifest applied for its module
is already decided by that manifest. The planner never deletes what the relay did not publish.
State records in a ``Plan`` are applied at once; the records around a partner call
(``intent_record`` before it, ``published_record`` or ``deleted_record`` after it) are the
executor's.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from enum import StrEnum

from consumer.core.events import Document, DocumentCreated, Module
from consumer.core.guard import DeletionGuard
from consumer.core.manifest import CompleteManifest
from consumer.core.routing import Action, Reason, RoutingTable, Verdict
from consumer.core.state import (
    BuildingRecord,
    DocKey,
    DocStatus,
    DocumentRecord,
    StateRecord,
    Tombstone,
    to_epoch_us,
)
from consumer.core.view import PublishedView


class Lane(StrEnum):
    LIVE = "live"  # document-created events: go first
    BACKFILL = "backfill"  # manifests and retries: fair share per agency


class Outcome(StrEnum):
    UPLOAD = "upload"
    UNCHANGED = "unchanged"  # same content already published, uploading or baseline
    SUPERSEDED = "superseded"  # a manifest taken at or after the event already decided
    STALE = "stale"  # a newer version or a newer manifest is already applied
    FILTERED = "filtered"  # routing never sends it (a published version is withdrawn)
    PARKED = "parked"  # waits for an operator (unmapped building)
    APPLIED = "applied"  # a manifest reconciled its building
    HELD = "held"  # ... and the guard held its withdrawals
    UNSERVED = "unserved"  # a manifest of an agency or modules the relay does not serve
    RELEASED = "released"
    DISCARDED = "discarded"
    RETRIED = "retried"


@dataclass(frozen=True, slots=True)
class Upload:
    """Send ``document``: a new upload, or an update of ``remote_id`` when it is set.

    ``previous`` is the record it replaces; an ``uploading`` one means an earlier upload of the
    same document may still be in flight and must be settled first.
    """

    key: DocKey
    document: Document
    condominium_id: str
    lane: Lane
    seen_at: dt.datetime
    remote_id: str | None = None
    previous: DocumentRecord | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    """Withdraw a document the relay published. ``remote_id`` is None only for an upload intent
    whose result is not known yet: the executor settles that upload first. Once the partner
    acknowledged, ``deleted_record`` is what stands for the document (usually a tombstone)."""

    key: DocKey
    condominium_id: str | None
    remote_id: str | None
    leaves: DocumentRecord | None = None


Operation = Upload | Delete


@dataclass(frozen=True, slots=True)
class Plan:
    outcome: Outcome
    operations: tuple[Operation, ...] = ()
    records: tuple[StateRecord, ...] = ()


def _owned(record: DocumentRecord) -> bool:
    """Whether the relay put (or may have put) this document on the partner."""
    if record.status is DocStatus.PARKED:
        return record.remote_id is not None
    return record.status in (DocStatus.PUBLISHED, DocStatus.DELETE_HELD, DocStatus.UPLOADING)


def _delete(record: DocumentRecord) -> Delete:
    return Delete(record.key, record.condominium_id, record.remote_id)


_SETTLED = frozenset(
    {DocStatus.PUBLISHED, DocStatus.UPLOADING, DocStatus.DELETE_HELD, DocStatus.BASELINE}
)
"""Statuses for which the same content needs nothing more (parked and filtered are reconsidered)."""


def _unroute(current: DocumentRecord) -> tuple[list[Operation], list[StateRecord]]:
    """A document routing does not forward: withdraw what was sent, forget the rest."""
    if _owned(current):
        return [_delete(current)], []
    return [], [Tombstone(current.key)]


def _record(
    key: DocKey,
    document: Document,
    status: DocStatus,
    seen_at: dt.datetime,
    *,
    remote_id: str | None = None,
    condominium_id: str | None = None,
) -> DocumentRecord:
    return DocumentRecord(
        key=key,
        status=status,
        sha256=document.content.sha256,
        module=document.module,
        seen_at=seen_at,
        document_date=document.document_date,
        size_bytes=document.content.size_bytes,
        remote_id=remote_id,
        condominium_id=condominium_id,
    )


def _park(
    key: DocKey,
    document: Document,
    verdict: Verdict,
    seen_at: dt.datetime,
    current: DocumentRecord | None,
) -> list[StateRecord]:
    """A parked record keeps the document (to retry it) and whatever the partner already holds."""
    if (
        current is not None
        and current.status is DocStatus.PARKED
        and current.sha256 == document.content.sha256
    ):
        return []
    record = _record(
        key,
        document,
        DocStatus.PARKED,
        seen_at,
        remote_id=current.remote_id if current is not None else None,
        condominium_id=current.condominium_id if current is not None else None,
    )
    return [dataclasses.replace(record, parked_reason=str(verdict.reason), document=document)]


def _upload(
    key: DocKey,
    document: Document,
    *,
    condominium_id: str,
    lane: Lane,
    seen_at: dt.datetime,
    current: DocumentRecord | None,
) -> Upload:
    if current is not None and _owned(current) and current.remote_id is not None:
        # an update goes where the document already is
        condominium_id = current.condominium_id or condominium_id
        return Upload(key, document, condominium_id, lane, seen_at, current.remote_id, current)
    return Upload(key, document, condominium_id, lane, seen_at, None, current)


def plan_document(view: PublishedView, routing: RoutingTable, event: DocumentCreated) -> Plan:
    """The live lane: one document-created event."""
    document = event.document
    key = DocKey(event.agency_id, event.building_id, document.id)
    occurred_us = to_epoch_us(event.occurred_at)
    building = view.building(event.agency_id, event.building_id)
    decided = building.manifest_taken_at.get(document.module) if building else None
    if decided is not None and occurred_us <= to_epoch_us(decided):
        return Plan(Outcome.SUPERSEDED)
    current = view.document(key)
    if current is not None and to_epoch_us(current.seen_at) > occurred_us:
        return Plan(Outcome.STALE)
    verdict = routing.decide(event.agency_id, event.building_id, document)
    if verdict.action is Action.FILTER:
        return _filtered(key, document, verdict, event.occurred_at, current)
    if (
        current is not None
        and current.status in _SETTLED
        and current.sha256 == document.content.sha256
    ):
        # a held withdrawal published again after the manifest that left it out: wanted after all
        unheld = (_unheld(current),) if current.status is DocStatus.DELETE_HELD else ()
        return Plan(Outcome.UNCHANGED, records=unheld)
    if verdict.condominium_id is None:
        parked = _park(key, document, verdict, event.occurred_at, current)
        return Plan(Outcome.PARKED, records=tuple(parked))
    upload = _upload(
        key,
        document,
        condominium_id=verdict.condominium_id,
        lane=Lane.LIVE,
        seen_at=event.occurred_at,
        current=current,
    )
    return Plan(Outcome.UPLOAD, (upload,))


def _filtered(
    key: DocKey,
    document: Document,
    verdict: Verdict,
    seen_at: dt.datetime,
    current: DocumentRecord | None,
) -> Plan:
    """A version routing does not forward: withdraw an earlier one that was sent.

    When its audience is what stops it, it is remembered until a newer manifest, so that an
    older manifest read late cannot bring back a version routing forwarded (say, before its
    audience became owners). A disabled module or an agency not served leaves no trace.
    """
    marker = None
    if verdict.reason in _AUDIENCE_REASONS:
        marker = _record(key, document, DocStatus.FILTERED, seen_at)
    if current is not None and _owned(current):
        return Plan(Outcome.FILTERED, (dataclasses.replace(_delete(current), leaves=marker),))
    return Plan(Outcome.FILTERED, records=() if marker is None else (marker,))


_AUDIENCE_REASONS = frozenset({Reason.AUDIENCE_NOT_FORWARDED, Reason.INDIVIDUAL_NEVER_FORWARDED})


def _unheld(record: DocumentRecord) -> DocumentRecord:
    return dataclasses.replace(record, status=DocStatus.PUBLISHED, held_by=None)


class _ManifestPlanner:
    """The state of planning one manifest; ``plan_manifest`` is its only user."""

    def __init__(
        self, view: PublishedView, routing: RoutingTable, manifest: CompleteManifest
    ) -> None:
        self.view = view
        self.routing = routing
        self.manifest = manifest
        self.taken_us = to_epoch_us(manifest.taken_at)
        building = view.building(manifest.agency_id, manifest.building_id)
        self.decided = dict(building.manifest_taken_at) if building is not None else {}
        self.covered = {
            module
            for module in manifest.modules
            if module not in self.decided or to_epoch_us(self.decided[module]) < self.taken_us
        }
        agency = routing.agency(manifest.agency_id)
        self.first_publication = agency.first_publication if agency is not None else None
        self.operations: list[Operation] = []
        self.records: list[StateRecord] = []

    def listed(self, document: Document) -> None:
        """One item of the manifest, in a module it covers."""
        manifest = self.manifest
        key = DocKey(manifest.agency_id, manifest.building_id, document.id)
        brief = self.view.brief(key)
        if brief is not None and brief.seen_at_us > self.taken_us:
            return  # a version seen after the snapshot was taken is newer than this item
        verdict = self.routing.decide(manifest.agency_id, manifest.building_id, document)
        if (
            brief is not None
            and brief.status in _SETTLED
            and brief.sha256 == document.content.sha256
            and brief.status is not DocStatus.DELETE_HELD
            and verdict.action is not Action.FILTER
        ):
            return  # the common case, decided without rebuilding the record
        current = self.view.document(key)
        if verdict.action is Action.FILTER:
            if current is not None:
                operations, records = _unroute(current)
                self.operations += operations
                self.records += records
            return
        if current is not None and current.status in _SETTLED:
            if current.sha256 == document.content.sha256:
                if current.status is DocStatus.DELETE_HELD:
                    self.records.append(_unheld(current))
                return
        elif self.is_baseline(document, current):
            self.records.append(_record(key, document, DocStatus.BASELINE, manifest.taken_at))
            return
        if verdict.condominium_id is None:
            self.records += _park(key, document, verdict, manifest.taken_at, current)
            return
        upload = _upload(
            key,
            document,
            condominium_id=verdict.condominium_id,
            lane=Lane.BACKFILL,
            seen_at=manifest.taken_at,
            current=current,
        )
        self.operations.append(upload)

    def is_baseline(self, document: Document, current: DocumentRecord | None) -> bool:
        """First publication of the module, and the agency's mode does not send this one."""
        return (
            self.first_publication is not None
            and document.module not in self.decided
            and (current is None or current.remote_id is None)
            and not self.first_publication.sends(document.document_date)
        )

    def withdrawals(self) -> list[DocumentRecord]:
        """Documents of covered modules seen before the snapshot and absent from it."""
        manifest = self.manifest
        withdrawn = []
        for record in self.view.seen_before(
            manifest.agency_id,
            manifest.building_id,
            manifest.taken_at,
            modules=self.covered,
            excluding={document.id for document in manifest.items},
        ):
            if _owned(record):
                withdrawn.append(record)
            else:
                self.records.append(Tombstone(record.key))  # baseline, parked, filtered: not sent
        return withdrawn


def plan_manifest(
    view: PublishedView, routing: RoutingTable, manifest: CompleteManifest, guard: DeletionGuard
) -> Plan:
    """Reconcile one building with a complete manifest (uploads go to the backfill lane)."""
    planner = _ManifestPlanner(view, routing, manifest)
    if not planner.covered:
        return Plan(Outcome.STALE)
    listed = {d.id: d for d in manifest.items if d.module in planner.covered}
    for document in listed.values():
        planner.listed(document)
    withdrawn = planner.withdrawals()
    published = view.published_count(manifest.agency_id, manifest.building_id, planner.covered)
    outcome = Outcome.APPLIED
    if guard.holds(deleting=len(withdrawn), published=published, listed=len(listed)):
        outcome = Outcome.HELD
        planner.records += [
            dataclasses.replace(record, status=DocStatus.DELETE_HELD, held_by=manifest.snapshot_id)
            for record in withdrawn
            if record.status in (DocStatus.PUBLISHED, DocStatus.DELETE_HELD)
            and record.held_by != manifest.snapshot_id
        ]
    else:
        planner.operations += [_delete(record) for record in withdrawn]
    # Only modules the relay serves for this agency are "decided": one that is enabled later (or
    # an agency added to the routing later) then gets its first publication, in its own mode,
    # instead of being taken as already published.
    agency = routing.agency(manifest.agency_id)
    served = planner.covered & agency.modules if agency is not None else set()
    if served:
        decided = planner.decided | dict.fromkeys(served, manifest.taken_at)
        planner.records.append(
            BuildingRecord(manifest.agency_id, manifest.building_id, decided, True)
        )
    elif not planner.operations and not planner.records:
        outcome = Outcome.UNSERVED
    return Plan(outcome, tuple(planner.operations), tuple(planner.records))


# -- records around a partner call, and operator actions ------------------------------------------


def intent_record(upload: Upload) -> DocumentRecord:
    """Written before the partner call: after a crash, the outcome is looked up, not guessed."""
    return _record(
        upload.key,
        upload.document,
        DocStatus.UPLOADING,
        upload.seen_at,
        remote_id=upload.remote_id,
        condominium_id=upload.condominium_id,
    )


def published_record(upload: Upload, remote_id: str, sha256: str) -> DocumentRecord:
    """Written once the partner acknowledged the upload."""
    record = _record(
        upload.key,
        upload.document,
        DocStatus.PUBLISHED,
        upload.seen_at,
        remote_id=remote_id,
        condominium_id=upload.condominium_id,
    )
    return dataclasses.replace(record, sha256=sha256)


def deleted_record(delete: Delete) -> StateRecord:
    """Written once the partner acknowledged a withdrawal."""
    return delete.leaves if delete.leaves is not None else Tombstone(delete.key)


def release_held(view: PublishedView, agency_id: str, building_id: str) -> Plan:
    """Operator: carry out the withdrawals the guard held for one building."""
    held = view.held(agency_id, building_id)
    return Plan(Outcome.RELEASED, tuple(_delete(record) for record in held))


def discard_held(view: PublishedView, agency_id: str, building_id: str) -> Plan:
    """Operator: keep the documents; they are published again as far as the relay knows."""
    held = view.held(agency_id, building_id)
    return Plan(Outcome.DISCARDED, records=tuple(_unheld(record) for record in held))


def retry_parked(view: PublishedView, routing: RoutingTable) -> Plan:
    """After a configuration fix: upload parked documents that routing now forwards, and carry
    out parked withdrawals (a parked record without a document, naming the partner's one)."""
    operations: list[Operation] = []
    records: list[StateRecord] = []
    for record in view.parked():
        document = record.document
        if document is None:
            if record.remote_id is not None:
                operations.append(_delete(record))
            continue
        key = record.key
        verdict = routing.decide(key.agency_id, key.building_id, document)
        if verdict.condominium_id is not None:
            upload = _upload(
                key,
                document,
                condominium_id=verdict.condominium_id,
                lane=Lane.BACKFILL,
                seen_at=record.seen_at,
                current=record,
            )
            operations.append(upload)
        elif verdict.action is Action.FILTER:
            ops, recs = _unroute(record)
            operations += ops
            records += recs
    return Plan(Outcome.RETRIED, tuple(operations), tuple(records))


def unapproved_modules(
    view: PublishedView, routing: RoutingTable, manifest: CompleteManifest, plan: Plan
) -> set[str]:
    """Modules whose first publication ``plan`` would send without an operator's approval.

    Only agencies whose mode sends history and whose routing asks for approval wait; an approval
    covers the modules enabled when it was given, so a module enabled later waits again.
    """
    agency = routing.agency(manifest.agency_id)
    if agency is None or not agency.needs_approval:
        return set()
    building = view.building(manifest.agency_id, manifest.building_id)
    decided = building.manifest_taken_at if building is not None else {}
    controls = view.agency(manifest.agency_id)
    approved = controls.approved_modules if controls is not None else frozenset()
    return {
        operation.document.module.value
        for operation in plan.operations
        if isinstance(operation, Upload)
        and operation.lane is Lane.BACKFILL
        and operation.document.module not in decided
        and operation.document.module not in approved
    }


# -- the dry run of a first publication ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DryRunLine:
    """What one manifest would do to one module of one building."""

    agency_id: str
    building_id: str
    module: Module
    uploads: int = 0
    upload_bytes: int = 0
    baseline: int = 0
    deletes: int = 0
    held: int = 0
    parked: int = 0


@dataclass(frozen=True, slots=True)
class DryRun:
    """Counts, bytes and duration of a first publication, before anything is sent."""

    lines: tuple[DryRunLine, ...] = ()

    @property
    def uploads(self) -> int:
        return sum(line.uploads for line in self.lines)

    @property
    def upload_bytes(self) -> int:
        return sum(line.upload_bytes for line in self.lines)

    @property
    def baseline(self) -> int:
        return sum(line.baseline for line in self.lines)

    @property
    def deletes(self) -> int:
        return sum(line.deletes for line in self.lines)

    def estimated_seconds(self, rate_per_second: float) -> float:
        """Seconds the partner calls take at ``rate_per_second``: one per upload or delete."""
        return (self.uploads + self.deletes) / rate_per_second

    def __add__(self, other: DryRun) -> DryRun:
        return DryRun(self.lines + other.lines)


def plan_first_publication(
    view: PublishedView,
    routing: RoutingTable,
    manifest: CompleteManifest,
    guard: DeletionGuard | None = None,
) -> DryRun:
    """What applying ``manifest`` now would send, record as baseline, delete or hold.

    Nothing is applied. Without a ``guard``, deletions are counted as if none were held.
    """
    plan = plan_manifest(view, routing, manifest, guard or DeletionGuard(1.0, 2**62))
    counts: dict[Module, dict[str, int]] = {}

    def add(module: Module, field: str, amount: int = 1) -> None:
        line = counts.setdefault(module, {})
        line[field] = line.get(field, 0) + amount

    for operation in plan.operations:
        if isinstance(operation, Upload):
            add(operation.document.module, "uploads")
            add(operation.document.module, "upload_bytes", operation.document.content.size_bytes)
        elif (withdrawn := view.document(operation.key)) is not None:
            add(withdrawn.module, "deletes")
    for record in plan.records:
        if isinstance(record, DocumentRecord) and record.status in _DRY_RUN_FIELDS:
            add(record.module, _DRY_RUN_FIELDS[record.status])
    return DryRun(
        tuple(
            DryRunLine(manifest.agency_id, manifest.building_id, module, **fields)
            for module, fields in sorted(counts.items())
        )
    )


_DRY_RUN_FIELDS = {
    DocStatus.BASELINE: "baseline",
    DocStatus.DELETE_HELD: "held",
    DocStatus.PARKED: "parked",
}
