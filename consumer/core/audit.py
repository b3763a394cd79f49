"""The audit's rules: the differences between the view and what the partner holds, and the repair.

Pure: the partner's documents come in as values (anything with ``remote_id``, ``reference`` and
``sha256``), and the documents to send again as the events they were read from, so the comparison
and the repair plan are tested without HTTP or Kafka. Fetching the partner's list and sending
repair commands is the ops surface's part (``consumer/ops/audit.py``); looking a repair's findings
up again is the partner edge's (``consumer/partner/copies.py``), and reading the input again the
Kafka edge's (``consumer/kafka/resend.py``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from consumer.core.commands import Finding, FindingKind
from consumer.core.events import Document, DocumentCreated, Event, ManifestSnapshot
from consumer.core.planning.plan import Delete, Lane, Operation, Outcome, Plan, Upload
from consumer.core.state import (
    ON_PARTNER,
    DocKey,
    DocStatus,
    DocumentRecord,
    StateRecord,
    Tombstone,
)
from consumer.core.view import PublishedView


class HeldDocument(Protocol):
    """A document the partner holds, as the audit sees it."""

    @property
    def remote_id(self) -> str: ...

    @property
    def reference(self) -> str | None: ...

    @property
    def sha256(self) -> str | None: ...


def compare(
    records: Iterable[DocumentRecord], remote: Iterable[HeldDocument]
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


@dataclass(frozen=True, slots=True)
class Resend:
    """A document to send again, as the newest input record of the relay that described it."""

    document: Document
    seen_at: dt.datetime  # occurred_at of the event, or taken_at of the manifest
    from_manifest: bool


Copies = Mapping[str, Sequence[HeldDocument]]
"""The partner's copies of each reference, as the owning replica looked them up; a reference it
could not look up is absent, and its findings are not confirmed."""


def to_resend(findings: Iterable[Finding], copies: Copies) -> frozenset[str]:
    """The document ids whose content a repair needs: the missing and the changed ones that the
    partner's ``copies`` bear out."""
    return frozenset(f.document_id for f in findings if _borne_out(f, copies))


def _copy_named(finding: Finding, copies: Copies) -> HeldDocument | None:
    """The copy ``finding`` names, if the lookup of its reference found it with that reference."""
    return next(
        (
            copy
            for copy in copies.get(finding.document_id, ())
            if copy.remote_id == finding.remote_id and copy.reference == finding.document_id
        ),
        None,
    )


def _borne_out(finding: Finding, copies: Copies) -> bool:
    """Whether the partner's answer bears a missing or changed ``finding`` out: no copy with its
    remote id, or that copy with another sha256 than the view's."""
    if finding.document_id not in copies:
        return False  # not asked: nothing is known
    held = _copy_named(finding, copies)
    if finding.kind is FindingKind.MISSING:
        return held is None
    if finding.kind is FindingKind.CHANGED:
        return held is not None and held.sha256 not in (None, finding.view_sha256)
    return False


def keep_newest(
    found: dict[str, Resend],
    event: Event,
    place: tuple[str, str],
    wanted: frozenset[str],
) -> None:
    """Keep in ``found`` the newest description in ``event`` of each wanted document of the
    building ``place`` (agency, building), by the planner's rule: a manifest taken at or after an
    event's time decides."""
    if (event.agency_id, event.building_id) != place:
        return
    if isinstance(event, DocumentCreated):
        candidates = [Resend(event.document, event.occurred_at, from_manifest=False)]
    elif isinstance(event, ManifestSnapshot):
        candidates = [Resend(item, event.taken_at, from_manifest=True) for item in event.items]
    else:
        return
    for candidate in candidates:
        document_id = candidate.document.id
        if document_id not in wanted:
            continue
        kept = found.get(document_id)
        if kept is None or (candidate.seen_at, candidate.from_manifest) >= (
            kept.seen_at,
            kept.from_manifest,
        ):
            found[document_id] = candidate


def plan_repair(
    view: PublishedView,
    agency_id: str,
    building_id: str,
    condominium_id: str | None,
    findings: Iterable[Finding],
    *,
    copies: Copies,
    resend: Mapping[str, Resend] | None = None,
) -> Plan:
    """What the owning replica does with an audit's findings, each checked again first: against
    the partner's ``copies`` of its reference (looked up by the replica itself) and the view.

    A finding names what to check, never what to delete. A copy is withdrawn only when the
    lookup found it carrying the relay's reference and the view does not hold it (the view's
    record of that document has another remote id, or the view does not know the reference); a
    document without the relay's reference is never touched. A missing or changed document found
    in ``resend`` (read again from the relay's input) is uploaded again on the backfill lane:
    created anew, or updated in place of the copy whose file was replaced. One no longer in the
    input (beyond its retention) is forgotten, or takes the partner's sha256, so that LSC's next
    manifest of the building sends it again.
    """
    resend = resend or {}
    operations: list[Operation] = []
    records: list[StateRecord] = []
    for finding in findings:
        key = DocKey(agency_id, building_id, finding.document_id)
        current = view.document(key)
        if finding.kind is FindingKind.UNEXPECTED:
            held = _copy_named(finding, copies)
            if held is None:
                continue  # not a copy of the relay's on the partner (gone, or never one)
            if current is not None and (
                current.remote_id == held.remote_id or current.status is DocStatus.UPLOADING
            ):
                continue  # the view knows it by now, or an upload of it is under way
            # A copy the view does not know (a duplicate, or one the view forgot): withdraw that
            # copy only. Its operation goes under a key of its own (no LSC document id starts
            # with "~"), so it neither waits behind nor changes the document's own record.
            copy = DocKey(agency_id, building_id, f"~copy:{held.remote_id}")
            operations.append(Delete(copy, condominium_id, held.remote_id))
            continue
        if current is None or current.status not in ON_PARTNER:
            continue
        if current.remote_id != finding.remote_id or current.sha256 != finding.view_sha256:
            continue  # settled meanwhile
        if not _borne_out(finding, copies):
            continue  # the partner holds the view's copy as the view records it
        partner_sha256 = None
        if (held := _copy_named(finding, copies)) is not None:
            partner_sha256 = held.sha256
        source = resend.get(finding.document_id)
        condominium = condominium_id or current.condominium_id
        if source is not None and condominium is not None:
            remote_id, previous = None, current
            if finding.kind is FindingKind.CHANGED:
                # The copy holds the partner's file: an update compared with the view's sha256
                # would be skipped as already sent.
                remote_id = finding.remote_id
                previous = dataclasses.replace(current, sha256=partner_sha256 or "")
            upload = Upload(
                key,
                source.document,
                condominium,
                Lane.BACKFILL,
                current.seen_at,
                remote_id=remote_id,
                previous=previous,
            )
            operations.append(upload)
        elif finding.kind is FindingKind.MISSING:
            records.append(Tombstone(key))
        elif partner_sha256 is not None:
            records.append(dataclasses.replace(current, sha256=partner_sha256))
    return Plan(Outcome.APPLIED, tuple(operations), tuple(records))
