"""The audit: what ChouetteCopro holds with the relay's references, against the relay's view.

Per condominium, the partner's documents that carry a reference (the relay's; hand-made ones have
none and are never looked at again) are compared with the view's documents of every building
mapped to that condominium: **missing** (the view says published, the partner does not hold it),
**unexpected** (the partner holds it, the view does not know that document id) and **changed**
(different sha256). A repair is an operator command per building, carried out by the replica that
owns it after checking each finding against its current view: an unexpected document is deleted
through the scheduler, a missing one is forgotten and a changed one takes the partner's sha256, so
that the next manifest sends them again like any delta.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from consumer.commands import AgencyAction, Finding, FindingKind
from consumer.errors import ConfigError
from consumer.partner.client import ChouetteCoproClient, RemoteDocument, list_documents
from consumer.partner.keys import ApiKeyStore
from consumer.planner import Delete, Outcome, Plan
from consumer.state import DocKey, DocStatus, DocumentRecord, StateRecord, Tombstone
from consumer.view import ON_PARTNER, PublishedView

if TYPE_CHECKING:
    from consumer.admin import Operator


def compare(
    records: Iterable[DocumentRecord], remote: Iterable[RemoteDocument]
) -> list[tuple[str, Finding]]:
    """``(building, finding)`` for every difference between the view and one condominium.

    ``records`` are the view's documents of the buildings mapped to the condominium; an upload
    still in flight is not a difference. Unexpected documents are put on the first building.
    """
    known = list(records)
    by_remote = {r.remote_id: r for r in known if r.remote_id is not None}
    relay_made = [d for d in remote if d.reference is not None]
    on_partner = {d.remote_id: d for d in relay_made}
    first_building = min((r.key.building_id for r in known), default=None)
    found: list[tuple[str, Finding]] = []
    for record in known:
        if record.status not in ON_PARTNER or record.remote_id is None:
            continue
        held = on_partner.get(record.remote_id)
        building = record.key.building_id
        if held is None:
            finding = Finding(
                kind=FindingKind.MISSING,
                document_id=record.key.document_id,
                remote_id=record.remote_id,
                view_sha256=record.sha256,
            )
            found.append((building, finding))
        elif held.sha256 is not None and held.sha256 != record.sha256:
            finding = Finding(
                kind=FindingKind.CHANGED,
                document_id=record.key.document_id,
                remote_id=record.remote_id,
                view_sha256=record.sha256,
                partner_sha256=held.sha256,
            )
            found.append((building, finding))
    for document in relay_made:
        if document.remote_id in by_remote or document.reference is None:
            continue
        owner = by_remote_reference(known, document.reference) or first_building
        if owner is None:
            continue  # no building of ours maps here any more: nothing to settle it against
        finding = Finding(
            kind=FindingKind.UNEXPECTED,
            document_id=document.reference,
            remote_id=document.remote_id,
            partner_sha256=document.sha256,
        )
        found.append((owner, finding))
    return found


def by_remote_reference(records: list[DocumentRecord], reference: str) -> str | None:
    """The building whose view knows this document id, if one does."""
    return next((r.key.building_id for r in records if r.key.document_id == reference), None)


def plan_repair(
    view: PublishedView,
    agency_id: str,
    building_id: str,
    condominium_id: str | None,
    findings: Iterable[Finding],
) -> Plan:
    """What the owning replica does with an audit's findings, each checked again first."""
    operations: list[Delete] = []
    records: list[StateRecord] = []
    for finding in findings:
        key = DocKey(agency_id, building_id, finding.document_id)
        current = view.document(key)
        if finding.kind is FindingKind.UNEXPECTED:
            if current is not None and (
                current.remote_id == finding.remote_id or current.status is DocStatus.UPLOADING
            ):
                continue  # the view knows it by now, or an upload of it is under way
            # A copy the view does not know (a duplicate, or one the view forgot): withdraw that
            # copy only. Its operation goes under a key of its own (no LSC document id starts
            # with "~"), so it neither waits behind nor changes the document's own record.
            copy = DocKey(agency_id, building_id, f"~copy:{finding.remote_id}")
            operations.append(Delete(copy, condominium_id, finding.remote_id))
            continue
        if current is None or current.status not in ON_PARTNER:
            continue
        if current.remote_id != finding.remote_id or current.sha256 != finding.view_sha256:
            continue  # settled meanwhile
        if finding.kind is FindingKind.MISSING:
            records.append(Tombstone(key))
        elif finding.partner_sha256 is not None:
            records.append(dataclasses.replace(current, sha256=finding.partner_sha256))
    return Plan(Outcome.APPLIED, tuple(operations), tuple(records))


async def run_audit(
    operator: Operator,
    agency_id: str,
    *,
    building_id: str | None = None,
    repair: bool = False,
    requested_by: str,
) -> dict[str, Any]:
    """Audit one agency (or one building) across the cluster; with ``repair``, queue the fixes."""
    settings = operator.settings
    config = operator.routing_table().agency(agency_id)
    if config is None:
        raise ValueError(f"agency {agency_id} is not in the routing file")
    if not settings.partner.base_url:
        raise ConfigError("set CHOUETTE_RELAY_PARTNER__BASE_URL: the audit asks ChouetteCopro")
    buildings_of: dict[str, list[str]] = {}
    for building, condominium in sorted(config.condominia.items()):
        if building_id in (None, building):
            buildings_of.setdefault(condominium, []).append(building)
    if not buildings_of:
        raise ValueError(f"building {building_id} of {agency_id} is not mapped to a condominium")
    records: dict[str, list[DocumentRecord]] = {}
    for view in await operator.views():
        for building in {b for bs in buildings_of.values() for b in bs}:
            records.setdefault(building, []).extend(view.documents(agency_id, building))
    report: list[dict[str, Any]] = []
    to_repair: dict[str, list[Finding]] = {}
    keys = ApiKeyStore(settings.partner.api_keys_dir)
    async with ChouetteCoproClient(
        base_url=settings.partner.base_url, api_keys=keys, timeout_s=settings.partner.timeout_s
    ) as partner:
        for condominium, buildings in sorted(buildings_of.items()):
            remote = await list_documents(partner, agency_id=agency_id, condominium_id=condominium)
            known = [r for b in buildings for r in records.get(b, [])]
            findings = compare(known, remote)
            for building, finding in findings:
                to_repair.setdefault(building, []).append(finding)
            report.append(
                {
                    "condominium": condominium,
                    "buildings": buildings,
                    "relay_documents": sum(1 for r in known if r.status in ON_PARTNER),
                    "partner_documents": sum(1 for d in remote if d.reference is not None),
                    "hand_made": sum(1 for d in remote if d.reference is None),
                    **{
                        kind.value: [
                            {"building": b, **f.model_dump(exclude={"kind"}, exclude_none=True)}
                            for b, f in findings
                            if f.kind is kind
                        ]
                        for kind in FindingKind
                    },
                }
            )
    totals = {kind.value: sum(len(c[kind.value]) for c in report) for kind in FindingKind}
    result: dict[str, Any] = {"agency": agency_id, "findings": totals, "condominia": report}
    if repair:
        queued = []
        for building, fixes in sorted(to_repair.items()):
            for start in range(0, len(fixes), _PER_COMMAND):
                queued.append(
                    await operator.queue(
                        AgencyAction.REPAIR,
                        agency_id,
                        building,
                        requested_by=requested_by,
                        findings=tuple(fixes[start : start + _PER_COMMAND]),
                    )
                )
        result["repairs"] = queued
    return result


_PER_COMMAND = 500  # findings per repair command: well under the topic's message size
