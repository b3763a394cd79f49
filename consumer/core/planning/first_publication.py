"""First-publication rules: the operator's approval, and the dry run of what would be sent.

A module of a building is in its first publication until a manifest covering it is applied; what
the agency's mode sends of its history is the manifest planner's (baseline). Here: whether such a
plan waits for an approval, the counts, bytes and duration it would take, sending nothing, and
the plan's fingerprint. An agency's plan spans the input partitions, so its fingerprint is made
of one share per partition (a digest of what the partition's waiting manifests would do): the
dry run computes every share, and the replica owning a partition computes its own share again
when the approval arrives and refuses it if it differs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from consumer.core.events import Module
from consumer.core.guard import DeletionGuard
from consumer.core.manifest import CompleteManifest
from consumer.core.planning.manifests import plan_manifest
from consumer.core.planning.plan import Lane, Plan, Upload
from consumer.core.routing import RoutingTable
from consumer.core.state import DocStatus, DocumentRecord
from consumer.core.view import PublishedView


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


def awaiting_share(
    view: PublishedView,
    routing: RoutingTable,
    manifests: Iterable[CompleteManifest],
    guard: DeletionGuard,
) -> str:
    """One partition's share of an agency's plan: a digest of what each of ``manifests`` (the
    newest complete one of each of the agency's buildings in the partition) would send,
    withdraw or record, counting only those that wait for an approval."""
    lines: list[str] = []
    for manifest in manifests:
        plan = plan_manifest(view, routing, manifest, guard)
        if unapproved_modules(view, routing, manifest, plan):
            lines += plan_lines(plan)
    digest = hashlib.sha256()
    for line in sorted(lines):
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()[:16]


def plan_fingerprint(routing: RoutingTable, agency_id: str, shares: Sequence[str]) -> str:
    """The fingerprint an operator approves: the agency, its mode and modules, and the share of
    every partition in partition order. It changes when anything the plan would do does."""
    config = routing.agency(agency_id)
    digest = hashlib.sha256(f"{agency_id}\n".encode())
    if config is not None:
        modules = " ".join(sorted(m.value for m in config.modules))
        digest.update(f"{config.first_publication} {modules}\n".encode())
    for share in shares:
        digest.update(share.encode() + b"\n")
    return digest.hexdigest()[:16]


def plan_lines(plan: Plan) -> list[str]:
    """One line per document the plan sends, withdraws or records (baseline, held, parked)."""
    lines = []
    for operation in plan.operations:
        key = operation.key.encode().decode()
        if isinstance(operation, Upload):
            lines.append(f"upload {key} {operation.document.content.sha256}")
        else:
            lines.append(f"delete {key}")
    for record in plan.records:
        if isinstance(record, DocumentRecord):
            lines.append(f"{record.status} {record.key.encode().decode()} {record.sha256}")
    return lines
