"""Operator actions on one partition's held withdrawals and parked documents, as plans.

Releasing or discarding what the mass-deletion guard held for a building, and retrying parked
documents after a configuration fix; the processor runs them like any other plan.
"""

from __future__ import annotations

from consumer.core.planning.documents import unhold, unroute, upload_for, withdraw
from consumer.core.planning.plan import Lane, Operation, Outcome, Plan
from consumer.core.routing import Action, RoutingTable
from consumer.core.state import StateRecord
from consumer.core.view import PublishedView


def release_held(view: PublishedView, agency_id: str, building_id: str) -> Plan:
    """Operator: carry out the withdrawals the guard held for one building."""
    held = view.held(agency_id, building_id)
    return Plan(Outcome.RELEASED, tuple(withdraw(record) for record in held))


def discard_held(view: PublishedView, agency_id: str, building_id: str) -> Plan:
    """Operator: keep the documents; they are published again as far as the relay knows."""
    held = view.held(agency_id, building_id)
    return Plan(Outcome.DISCARDED, records=tuple(unhold(record) for record in held))


def retry_parked(view: PublishedView, routing: RoutingTable) -> Plan:
    """After a configuration fix: upload parked documents that routing now forwards, and carry
    out parked withdrawals (a parked record without a document, naming the partner's one)."""
    operations: list[Operation] = []
    records: list[StateRecord] = []
    for record in view.parked():
        document = record.document
        if document is None:
            if record.remote_id is not None:
                operations.append(withdraw(record))
            continue
        key = record.key
        verdict = routing.decide(key.agency_id, key.building_id, document)
        if verdict.condominium_id is not None:
            upload = upload_for(
                key,
                document,
                condominium_id=verdict.condominium_id,
                lane=Lane.BACKFILL,
                seen_at=record.seen_at,
                current=record,
            )
            operations.append(upload)
        elif verdict.action is Action.FILTER:
            ops, recs = unroute(record)
            operations += ops
            records += recs
    return Plan(Outcome.RETRIED, tuple(operations), tuple(records))
