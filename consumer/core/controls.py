"""What an operator command on an agency does to one partition: a pure function of its view.

Whoever wrote a command (the CLI, an admin endpoint, an older CLI, a forged record), the replica
that carries it out checks it first (``refusal``): a target its routing file does not know is
refused, and so is an approve whose share of the plan differs from the plan the partition
computes then (``approval_refusal``); neither leaves a record. Pause, resume and approve change
the agency record of the partition (the relay then hands the paused agencies to the scheduler,
and applies the first publications an approval releases); retry sends the partition's parked
documents of the agency (or of one building) again; repair settles an audit's findings for one
building, each finding checked with the partner first (``consumer.core.audit``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from consumer.core.audit import Copies, Resend, plan_repair
from consumer.core.commands import AgencyAction, OperatorCommand, Refusal
from consumer.core.guard import DeletionGuard
from consumer.core.manifest import CompleteManifest
from consumer.core.planning.actions import retry_parked
from consumer.core.planning.first_publication import awaiting_share, plan_fingerprint
from consumer.core.planning.plan import Outcome, Plan
from consumer.core.routing import RoutingTable
from consumer.core.state import AgencyKey, AgencyRecord, BuildingKey, DocKey
from consumer.core.view import PublishedView

CONTROLS = frozenset({AgencyAction.PAUSE, AgencyAction.RESUME, AgencyAction.APPROVE})
"""Commands that change an agency's controls (what the scheduler and the approval gate read)."""


def refusal(routing: RoutingTable, command: OperatorCommand) -> Refusal | None:
    """Why this replica will not carry ``command`` out, or None: the agency must be in its
    routing file, and a building a command names must be mapped there to a condominium."""
    config = routing.agency(command.agency_id)
    if config is None:
        return Refusal.UNKNOWN_AGENCY
    if command.building_id is not None and command.building_id not in config.condominia:
        return Refusal.UNKNOWN_BUILDING
    return None


def approval_refusal(
    view: PublishedView,
    routing: RoutingTable,
    guard: DeletionGuard,
    command: OperatorCommand,
    *,
    partition: int,
    waiting: Iterable[CompleteManifest],
) -> Refusal | None:
    """Why this partition will not carry out an approve, or None. Its fingerprint must be made
    of the shares it carries, and the share of ``partition`` must be the one computed now from
    the view and the agency's manifests ``waiting`` for approval in the partition: an approve
    written for a plan that a later manifest changed is refused, whoever wrote it."""
    if command.command is not AgencyAction.APPROVE:
        return None
    shares = command.plan_shares
    if not shares:
        return Refusal.PLAN_UNCHECKED
    if partition >= len(shares):
        return Refusal.PLAN_CHANGED  # planned over fewer partitions than the topic has now
    if plan_fingerprint(routing, command.agency_id, shares) != command.plan:
        return Refusal.PLAN_CHANGED
    if awaiting_share(view, routing, waiting, guard) != shares[partition]:
        return Refusal.PLAN_CHANGED
    return None


def plan_agency_command(
    view: PublishedView,
    routing: RoutingTable,
    command: OperatorCommand,
    resend: Mapping[str, Resend] | None = None,
    copies: Copies | None = None,
) -> Plan:
    """The records and operations ``command`` causes in this partition. For a repair, ``copies``
    holds what the partner answered when the replica looked each finding's reference up (a
    finding it could not check is left alone), and ``resend`` what the partition's input still
    describes of its missing and changed documents."""
    agency, building, action = command.agency_id, command.building_id, command.command
    if action is AgencyAction.REPAIR and building is not None:
        config = routing.agency(agency)
        condominium = config.condominia.get(building) if config is not None else None
        return plan_repair(
            view,
            agency,
            building,
            condominium,
            command.findings,
            copies=copies or {},
            resend=resend,
        )
    if action is AgencyAction.RETRY:
        plan = retry_parked(view, routing)

        def concerned(key: DocKey | BuildingKey | AgencyKey) -> bool:
            if key.agency_id != agency:
                return False
            return building is None or getattr(key, "building_id", None) == building

        return Plan(
            plan.outcome,
            tuple(op for op in plan.operations if concerned(op.key)),
            tuple(record for record in plan.records if concerned(record.key)),
        )
    if action not in CONTROLS:
        return Plan(Outcome.UNCHANGED)
    current = view.agency(agency) or AgencyRecord(agency)
    record = dataclasses.replace(
        current, changed_by=command.requested_by, changed_at=command.requested_at
    )
    if action is AgencyAction.APPROVE:
        config = routing.agency(agency)
        modules = frozenset(config.modules) if config is not None else frozenset()
        record = dataclasses.replace(record, approved_plan=command.plan, approved_modules=modules)
    else:
        # A pause sets its own scope and clears the other; resume ends either.
        pausing = action is AgencyAction.PAUSE
        record = dataclasses.replace(
            record,
            paused=pausing and not command.backfill_only,
            backfill_paused=pausing and command.backfill_only,
        )
    return Plan(Outcome.APPLIED, records=(record,))
