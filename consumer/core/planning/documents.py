"""Document rules: what one new version of a document does to its record and to the partner.

``plan_document`` is the live lane (one document-created event); the helpers beside it (owned,
parked, routed away, uploaded where it already is) are the rules the manifest and the operator's
actions apply to each document too.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from consumer.core.events import Document, DocumentCreated
from consumer.core.planning.plan import (
    Delete,
    Lane,
    Operation,
    Outcome,
    Plan,
    Upload,
    document_record,
)
from consumer.core.routing import Action, Reason, RoutingTable, Verdict
from consumer.core.state import (
    DocKey,
    DocStatus,
    DocumentRecord,
    StateRecord,
    Tombstone,
    to_epoch_us,
)
from consumer.core.view import PublishedView


def is_owned(record: DocumentRecord) -> bool:
    """Whether the relay put (or may have put) this document on the partner."""
    if record.status is DocStatus.PARKED:
        return record.remote_id is not None
    return record.status in (DocStatus.PUBLISHED, DocStatus.DELETE_HELD, DocStatus.UPLOADING)


def withdraw(record: DocumentRecord) -> Delete:
    """The withdrawal of a document the relay put on the partner, where it put it."""
    return Delete(record.key, record.condominium_id, record.remote_id)


SETTLED = frozenset(
    {DocStatus.PUBLISHED, DocStatus.UPLOADING, DocStatus.DELETE_HELD, DocStatus.BASELINE}
)
"""Statuses for which the same content needs nothing more (parked and filtered are reconsidered)."""


def withdrawal(record: DocumentRecord, taken_at: dt.datetime) -> Delete:
    """A manifest's withdrawal of a document it leaves out; what it leaves is a marker of when.

    The manifest's own record becomes durable only once the building's work is done, while the
    withdrawal is durable as soon as the partner acknowledged it. Input read again after a crash
    in between (an earlier manifest, the document's event) must find the document withdrawn by a
    snapshot taken at ``taken_at``, not unknown, or it would publish it a second time. A newer
    manifest that leaves the document out forgets the marker.
    """
    marker = DocumentRecord(
        key=record.key,
        status=DocStatus.FILTERED,
        sha256=record.sha256,
        module=record.module,
        seen_at=taken_at,
        document_date=record.document_date,
        size_bytes=record.size_bytes,
    )
    return dataclasses.replace(withdraw(record), leaves=marker)


def unroute(current: DocumentRecord) -> tuple[list[Operation], list[StateRecord]]:
    """A document routing does not forward: withdraw what was sent, forget the rest."""
    if is_owned(current):
        return [withdraw(current)], []
    return [], [Tombstone(current.key)]


def park(
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
    record = document_record(
        key,
        document,
        DocStatus.PARKED,
        seen_at,
        remote_id=current.remote_id if current is not None else None,
        condominium_id=current.condominium_id if current is not None else None,
    )
    return [dataclasses.replace(record, parked_reason=str(verdict.reason), document=document)]


def upload_for(
    key: DocKey,
    document: Document,
    *,
    condominium_id: str,
    lane: Lane,
    seen_at: dt.datetime,
    current: DocumentRecord | None,
) -> Upload:
    """Send ``document``: an update where the relay already put it, or a new upload."""
    if current is not None and is_owned(current) and current.remote_id is not None:
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
        and current.status in SETTLED
        and current.sha256 == document.content.sha256
    ):
        # a held withdrawal published again after the manifest that left it out: wanted after all
        unheld = (unhold(current),) if current.status is DocStatus.DELETE_HELD else ()
        return Plan(Outcome.UNCHANGED, records=unheld)
    if verdict.condominium_id is None:
        parked = park(key, document, verdict, event.occurred_at, current)
        return Plan(Outcome.PARKED, records=tuple(parked))
    upload = upload_for(
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
    if verdict.reason in AUDIENCE_REASONS:
        marker = document_record(key, document, DocStatus.FILTERED, seen_at)
    if current is not None and is_owned(current):
        return Plan(Outcome.FILTERED, (dataclasses.replace(withdraw(current), leaves=marker),))
    return Plan(Outcome.FILTERED, records=() if marker is None else (marker,))


AUDIENCE_REASONS = frozenset({Reason.AUDIENCE_NOT_FORWARDED, Reason.INDIVIDUAL_NEVER_FORWARDED})
"""Why routing stops a version whose withdrawal is remembered (a ``filtered`` marker)."""


def unhold(record: DocumentRecord) -> DocumentRecord:
    """A held withdrawal given up: the document stands published again."""
    return dataclasses.replace(record, status=DocStatus.PUBLISHED, held_by=None)
