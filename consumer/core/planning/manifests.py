"""Manifest rules: reconciling one building with a complete manifest.

Listed documents are uploaded, left alone or recorded as baseline (a first publication whose mode
does not send them); documents of covered modules seen before the snapshot and absent from it are
withdrawn. Uploads go to the backfill lane. When the mass-deletion guard holds the manifest, the
documents it lists still flow, and those it would withdraw or keep unpublished wait for the
operator's decision (``actions.py``): the building record keeps the manifest as its question.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator

from consumer.core.events import Document
from consumer.core.guard import DeletionGuard
from consumer.core.manifest import CompleteManifest
from consumer.core.planning.documents import (
    AUDIENCE_REASONS,
    SETTLED,
    is_owned,
    let_go,
    park,
    unhold,
    unroute,
    upload_for,
    withdraw,
    withdrawal,
)
from consumer.core.planning.plan import (
    Lane,
    Operation,
    Outcome,
    Plan,
    document_record,
    run_to_end,
)
from consumer.core.routing import Action, RoutingTable, Verdict
from consumer.core.state import (
    BuildingRecord,
    DocKey,
    DocStatus,
    DocumentRecord,
    HeldManifest,
    HoldDecision,
    StateRecord,
    Tombstone,
    to_epoch_us,
)
from consumer.core.view import PublishedView


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
        self.building = building
        self.decided = dict(building.manifest_taken_at) if building is not None else {}
        held = building.held if building is not None else None
        # The undecided question of another snapshot: a manifest no newer than it is stale for
        # its modules, a newer one replaces it.
        self.question = (
            held
            if held is not None
            and held.decision is None
            and held.snapshot_id != manifest.snapshot_id
            else None
        )
        question = self.question
        self.covered = {
            module
            for module in manifest.modules
            if (module not in self.decided or to_epoch_us(self.decided[module]) < self.taken_us)
            and not (
                question is not None
                and module in question.modules
                and to_epoch_us(question.taken_at) >= self.taken_us
            )
        }
        # This very manifest, held before and discarded by the operator (read again after a
        # crash): what it lists flows, it decides nothing else.
        self.discarded = (
            held is not None
            and held.snapshot_id == manifest.snapshot_id
            and held.decision is HoldDecision.DISCARD
        )
        agency = routing.agency(manifest.agency_id)
        self.first_publication = agency.first_publication if agency is not None else None
        self.operations: list[Operation] = []
        self.records: list[StateRecord] = []
        self.marks: list[DocumentRecord] = []

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
            and brief.status in SETTLED
            and brief.sha256 == document.content.sha256
            and brief.status is not DocStatus.DELETE_HELD
            and verdict.action is not Action.FILTER
        ):
            return  # the common case, decided without rebuilding the record
        current = self.view.document(key)
        if verdict.action is Action.FILTER:
            if current is not None:
                self.filtered(document, verdict, current)
            return
        if current is not None and current.status in SETTLED:
            if current.sha256 == document.content.sha256:
                if current.status is DocStatus.DELETE_HELD:
                    self.records.append(unhold(current))
                return
        elif self.is_baseline(document, current):
            self.records.append(
                document_record(key, document, DocStatus.BASELINE, manifest.taken_at)
            )
            return
        if verdict.condominium_id is None:
            self.records += park(key, document, verdict, manifest.taken_at, current)
            return
        upload = upload_for(
            key,
            document,
            condominium_id=verdict.condominium_id,
            lane=Lane.BACKFILL,
            seen_at=manifest.taken_at,
            current=current,
        )
        self.operations.append(upload)

    def filtered(self, document: Document, verdict: Verdict, current: DocumentRecord) -> None:
        """A listed item routing does not forward: withdraw or forget what the relay has of it."""
        if verdict.reason not in AUDIENCE_REASONS:
            operations, records = unroute(current)
            self.operations += operations
            self.records += records
            return
        # As for an event: the withdrawal leaves a marker of when, and a marker stays (forgotten
        # once a newer manifest leaves the document out), so that an earlier manifest read again
        # after a crash, before this one is recorded as applied, cannot bring a version back.
        marker = document_record(current.key, document, DocStatus.FILTERED, self.manifest.taken_at)
        if is_owned(current):
            self.operations.append(dataclasses.replace(withdraw(current), leaves=marker))
        elif current.status is not DocStatus.FILTERED:
            self.records.append(marker)

    def is_baseline(self, document: Document, current: DocumentRecord | None) -> bool:
        """First publication of the module, and the agency's mode does not send this one."""
        return (
            self.first_publication is not None
            and document.module not in self.decided
            and (current is None or current.remote_id is None)
            and not self.first_publication.sends(document.document_date)
        )

    def left_out(self) -> list[DocumentRecord]:
        """Documents of covered modules seen before the snapshot and absent from it."""
        manifest = self.manifest
        return list(
            self.view.seen_before(
                manifest.agency_id,
                manifest.building_id,
                manifest.taken_at,
                modules=self.covered,
                excluding={document.id for document in manifest.items},
            )
        )

    def withdraw(self, left: list[DocumentRecord]) -> None:
        """The manifest applied: what the relay sent is withdrawn, the rest forgotten."""
        for record in left:
            if is_owned(record):
                self.operations.append(withdrawal(record, self.manifest.taken_at))
            else:
                self.records.append(Tombstone(record.key))  # baseline, parked, filtered: not sent

    def hold(self, left: list[DocumentRecord]) -> None:
        """The manifest held: what it would decide waits, marked with its snapshot.

        A published document's withdrawal is held; an upload still queued is held too (its mark
        stops it before it is sent, and it then records itself as waiting, with its document).
        Documents not on the partner and not being sent (baseline, parked, filtered) stay as
        they are: the partner holds none of them whatever the decision.
        """
        snapshot_id = self.manifest.snapshot_id
        for record in left:
            if record.held_by == snapshot_id:
                continue
            if record.status in (DocStatus.PUBLISHED, DocStatus.DELETE_HELD):
                held = dataclasses.replace(
                    record, status=DocStatus.DELETE_HELD, held_by=snapshot_id
                )
                self.records.append(held)
            elif record.status is DocStatus.UPLOADING or (
                record.status is DocStatus.UPLOAD_HELD and record.document is None
            ):
                mark = dataclasses.replace(
                    record, status=DocStatus.UPLOAD_HELD, held_by=snapshot_id
                )
                self.marks.append(mark)
            elif record.status is DocStatus.UPLOAD_HELD:
                self.records.append(dataclasses.replace(record, held_by=snapshot_id))

    def let_go_outside(self) -> None:
        """A newer manifest replaces the question: what waited for it in modules this one does
        not cover goes as if the held manifest had been discarded."""
        question, manifest = self.question, self.manifest
        if question is None:
            return
        for record in self.view.held(manifest.agency_id, manifest.building_id):
            if record.held_by == question.snapshot_id and record.module not in self.covered:
                operations, records, marks = let_go(record, self.routing)
                self.operations += operations
                self.records += records
                self.marks += marks


# Listed documents planned between two pauses of ``plan_manifest_in_steps`` (about 10 ms).
PLANNING_STEP = 2_000


def plan_manifest(
    view: PublishedView, routing: RoutingTable, manifest: CompleteManifest, guard: DeletionGuard
) -> Plan:
    """Reconcile one building with a complete manifest (uploads go to the backfill lane)."""
    return run_to_end(plan_manifest_in_steps(view, routing, manifest, guard))


def plan_manifest_in_steps(
    view: PublishedView,
    routing: RoutingTable,
    manifest: CompleteManifest,
    guard: DeletionGuard,
    *,
    step: int = PLANNING_STEP,
) -> Generator[None, None, Plan]:
    """``plan_manifest``, pausing (``yield``) after every ``step`` listed documents, so that a
    caller on an event loop lets other work run between the steps of a large manifest; the plan
    is the generator's return value. The view must change only by the records of partner
    outcomes meanwhile (as between any two records): the plan reads each document once."""
    planner = _ManifestPlanner(view, routing, manifest)
    if not planner.covered:
        return Plan(Outcome.STALE)
    listed = {d.id: d for d in manifest.items if d.module in planner.covered}
    for number, document in enumerate(listed.values(), start=1):
        planner.listed(document)
        if number % step == 0:
            yield
    if planner.discarded:
        return Plan(Outcome.DISCARDED, tuple(planner.operations), tuple(planner.records))
    left = planner.left_out()
    deleting = sum(1 for record in left if is_owned(record))
    published = view.published_count(manifest.agency_id, manifest.building_id, planner.covered)
    # Only modules the relay serves for this agency are "decided": one that is enabled later (or
    # an agency added to the routing later) then gets its first publication, in its own mode,
    # instead of being taken as already published.
    agency = routing.agency(manifest.agency_id)
    served = planner.covered & agency.modules if agency is not None else set()
    outcome = Outcome.APPLIED
    building = planner.building
    if guard.holds(deleting=deleting, published=published, listed=len(listed)):
        outcome = Outcome.HELD
        planner.hold(left)
        # Nothing is decided yet: the manifest is the building's question until an operator
        # answers it (``actions.py``), or a newer manifest replaces it.
        question = HeldManifest(manifest.snapshot_id, manifest.taken_at, frozenset(planner.covered))
        first_done = building.first_publication_done if building is not None else False
        planner.records.append(
            BuildingRecord(
                manifest.agency_id, manifest.building_id, planner.decided, first_done, question
            )
        )
    else:
        planner.withdraw(left)
        if served:
            decided = planner.decided | dict.fromkeys(served, manifest.taken_at)
            # A decided hold stays while it is newer (its manifest read again stays decided).
            held = building.held if building is not None else None
            kept = (
                held
                if held is not None
                and held.decision is not None
                and to_epoch_us(held.taken_at) > planner.taken_us
                else None
            )
            planner.records.append(
                BuildingRecord(manifest.agency_id, manifest.building_id, decided, True, kept)
            )
        elif not planner.operations and not planner.records:
            outcome = Outcome.UNSERVED
    planner.let_go_outside()
    return Plan(outcome, tuple(planner.operations), tuple(planner.records), tuple(planner.marks))
