"""Operator actions on one partition's held manifests and parked documents, as plans.

Releasing or discarding the manifest the mass-deletion guard held for a building, and retrying
parked documents after a configuration fix; the processor runs them like any other plan. A
release ends the building as if the manifest had been applied when it arrived, a discard as if it
had never come; the decision stays in the building record, so that the manifest read again after
a crash is not asked again.
"""

from __future__ import annotations

import dataclasses

from consumer.core.planning.documents import (
    is_owned,
    let_go,
    unroute,
    upload_for,
    withdraw,
    withdrawal,
)
from consumer.core.planning.plan import Lane, Operation, Outcome, Plan
from consumer.core.routing import Action, RoutingTable
from consumer.core.state import (
    BuildingRecord,
    DocStatus,
    DocumentRecord,
    HoldDecision,
    StateRecord,
    Tombstone,
    to_epoch_us,
)
from consumer.core.view import PublishedView


def release_held(view: PublishedView, agency_id: str, building_id: str) -> Plan:
    """Operator: apply the held manifest of one building. What it would withdraw is withdrawn,
    what it would keep unpublished is forgotten unsent, and its modules are decided."""
    building = view.building(agency_id, building_id)
    question = building.held if building is not None else None
    operations: list[Operation] = []
    records: list[StateRecord] = []
    for record in view.held(agency_id, building_id):
        if question is None:
            # marks whose question was not recorded yet (a crash in between): what they held
            operations += [withdraw(record)] if is_owned(record) else []
            records += [] if is_owned(record) else [Tombstone(record.key)]
        elif is_owned(record):
            operations.append(withdrawal(record, question.taken_at))
        else:
            # Not on the partner: a marker of when, as a withdrawal leaves, so that its event
            # read again after a crash finds it decided rather than unknown.
            records.append(
                DocumentRecord(
                    key=record.key,
                    status=DocStatus.FILTERED,
                    sha256=record.sha256,
                    module=record.module,
                    seen_at=question.taken_at,
                    document_date=record.document_date,
                    size_bytes=record.size_bytes,
                )
            )
    if building is not None and question is not None and question.decision is None:
        taken_us = to_epoch_us(question.taken_at)
        decided = dict(building.manifest_taken_at)
        for module in question.modules:
            if module not in decided or to_epoch_us(decided[module]) < taken_us:
                decided[module] = question.taken_at
        answered = dataclasses.replace(question, decision=HoldDecision.RELEASE)
        records.append(
            BuildingRecord(
                agency_id, building_id, decided, first_publication_done=True, held=answered
            )
        )
    return Plan(Outcome.RELEASED, tuple(operations), tuple(records))


def discard_held(
    view: PublishedView, routing: RoutingTable, agency_id: str, building_id: str
) -> Plan:
    """Operator: drop the held manifest of one building. Its held withdrawals stand published
    again, and what waited is sent."""
    building = view.building(agency_id, building_id)
    question = building.held if building is not None else None
    operations: list[Operation] = []
    records: list[StateRecord] = []
    marks: list[DocumentRecord] = []
    for record in view.held(agency_id, building_id):
        ops, recs, kept = let_go(record, routing)
        operations += ops
        records += recs
        marks += kept
    if building is not None and question is not None and question.decision is None:
        answered = dataclasses.replace(question, decision=HoldDecision.DISCARD)
        records.append(dataclasses.replace(building, held=answered))
    return Plan(Outcome.DISCARDED, tuple(operations), tuple(records), tuple(marks))


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
