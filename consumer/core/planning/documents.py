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
    intent_record,
)
from consumer.core.routing import Action, Reason, RoutingTable, Verdict
from consumer.core.state import (
    HELD,
    DocKey,
    DocStatus,
    DocumentRecord,
    HeldManifest,
    StateRecord,
    Tombstone,
    to_epoch_us,
)
from consumer.core.view import PublishedView


def is_owned(record: DocumentRecord) -> bool:
    """Whether the relay put (or may have put) this document on the partner."""
    if record.status is DocStatus.UPLOAD_HELD:
        # without its document: the mark of an upload queued or running, which may land yet
        return record.remote_id is not None or record.document is None
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


def plan_document(  # noqa: PLR0911 - one return per rule, in the order they apply
    view: PublishedView, routing: RoutingTable, event: DocumentCreated
) -> Plan:
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
    held = building.held if building else None
    if held is not None and held.decides(document.module, event.occurred_at):
        return _wait(key, document, verdict, event.occurred_at, current=current, held=held)
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


def _wait(
    key: DocKey,
    document: Document,
    verdict: Verdict,
    seen_at: dt.datetime,
    *,
    current: DocumentRecord | None,
    held: HeldManifest,
) -> Plan:
    """A version the held manifest decides: created before it was taken.

    A document it lists was reconciled by the manifest's own plan (a version seen at its
    ``taken_at``, or the same content left as it was): the event changes nothing. Any other is
    left out of it, so it waits for the operator's decision with its document.
    """
    if verdict.condominium_id is not None and current is not None and _queued(current):
        # Its upload is queued or running: this version joins it, held the same way, so that
        # it records itself once the work before it has said what the partner holds.
        upload = upload_for(
            key,
            document,
            condominium_id=verdict.condominium_id,
            lane=Lane.LIVE,
            seen_at=seen_at,
            current=current,
        )
        mark = dataclasses.replace(
            intent_record(upload), status=DocStatus.UPLOAD_HELD, held_by=held.snapshot_id
        )
        return Plan(Outcome.WAITING, (upload,), marks=(mark,))
    remote_id = condominium_id = None
    if current is not None:
        marked = current.status in HELD and current.held_by == held.snapshot_id
        same = current.sha256 == document.content.sha256
        if same and not marked and current.status in SETTLED:
            return Plan(Outcome.UNCHANGED)
        if same and marked and (current.status is DocStatus.DELETE_HELD or current.document):
            return Plan(Outcome.WAITING)  # this very version waits already
        if is_owned(current):
            remote_id, condominium_id = current.remote_id, current.condominium_id
    record = document_record(
        key,
        document,
        DocStatus.UPLOAD_HELD,
        seen_at,
        remote_id=remote_id,
        condominium_id=condominium_id or verdict.condominium_id,
    )
    waiting = dataclasses.replace(record, held_by=held.snapshot_id, document=document)
    return Plan(Outcome.WAITING, records=(waiting,))


def _queued(record: DocumentRecord) -> bool:
    """Whether the view shows an upload of the document queued or running (held or not)."""
    return record.status is DocStatus.UPLOADING or (
        record.status is DocStatus.UPLOAD_HELD and record.document is None
    )


def let_go(
    record: DocumentRecord, routing: RoutingTable
) -> tuple[list[Operation], list[StateRecord], list[DocumentRecord]]:
    """A document that waited for a held manifest no longer waits (the manifest is discarded,
    or a newer one leaves the document's module alone): it goes as if the hold had never been.

    Operations, records and marks (see ``Plan``): a held withdrawal stands published again, a
    held upload is sent, and an upload still queued when the hold began is let go.
    """
    if record.status is DocStatus.DELETE_HELD:
        return [], [unhold(record)], []
    document = record.document
    if document is None:
        # the mark of an upload still queued: the upload itself carries the document
        return [], [], [dataclasses.replace(record, status=DocStatus.UPLOADING, held_by=None)]
    key = record.key
    verdict = routing.decide(key.agency_id, key.building_id, document)
    if verdict.action is Action.FILTER:
        operations, records = unroute(record)
        return operations, records, []
    if verdict.condominium_id is None:
        return [], park(key, document, verdict, record.seen_at, record), []
    upload = upload_for(
        key,
        document,
        condominium_id=verdict.condominium_id,
        lane=Lane.LIVE,
        seen_at=record.seen_at,
        current=record,
    )
    return [upload], [], []


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
