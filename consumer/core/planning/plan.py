"""What a plan is made of: lanes, outcomes, partner operations, and the records around a call.

State records in a ``Plan`` are applied at once; the records around a partner call
(``intent_record`` before it, ``published_record`` or ``deleted_record`` after it) are the
executor's.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Generator
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from consumer.core.events import Document
from consumer.core.state import DocKey, DocStatus, DocumentRecord, StateRecord, Tombstone


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
    HELD = "held"  # ... and the guard held it: what it would decide waits for an operator
    WAITING = "waiting"  # a document a held manifest would keep unpublished waits with it
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
    """What one input (or operator action) does: ``records`` are applied to the view and
    written, ``operations`` go to the partner. ``marks`` are applied to the view only: they hold
    (``upload_held``) or let go (``uploading``) an upload already queued for the document, whose
    own records then say what it became (held before it was sent, or sent already)."""

    outcome: Outcome
    operations: tuple[Operation, ...] = ()
    records: tuple[StateRecord, ...] = ()
    marks: tuple[DocumentRecord, ...] = ()


def partner_sha256(upload: Upload) -> str:
    """The sha256 the partner holds under ``upload.remote_id`` as far as the record it replaces
    says ("" when unknown): a held upload's record describes the version waiting, not that one."""
    previous = upload.previous
    if previous is None or previous.status is DocStatus.UPLOAD_HELD:
        return ""
    return previous.sha256


def document_record(
    key: DocKey,
    document: Document,
    status: DocStatus,
    seen_at: dt.datetime,
    *,
    remote_id: str | None = None,
    condominium_id: str | None = None,
) -> DocumentRecord:
    """The record of ``document`` at ``status``, without a parked reason or a held mark."""
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


def intent_record(upload: Upload) -> DocumentRecord:
    """Written before the partner call: after a crash, the outcome is looked up, not guessed."""
    return document_record(
        upload.key,
        upload.document,
        DocStatus.UPLOADING,
        upload.seen_at,
        remote_id=upload.remote_id,
        condominium_id=upload.condominium_id,
    )


def published_record(upload: Upload, remote_id: str, sha256: str) -> DocumentRecord:
    """Written once the partner acknowledged the upload."""
    record = document_record(
        upload.key,
        upload.document,
        DocStatus.PUBLISHED,
        upload.seen_at,
        remote_id=remote_id,
        condominium_id=upload.condominium_id,
    )
    return dataclasses.replace(record, sha256=sha256)


def held_upload_record(upload: Upload, held_by: str, remote_id: str | None) -> DocumentRecord:
    """An upload a held manifest stopped before it was sent: it waits, with its document.
    ``remote_id`` names the version the partner holds, if any (the one it would have updated)."""
    record = document_record(
        upload.key,
        upload.document,
        DocStatus.UPLOAD_HELD,
        upload.seen_at,
        remote_id=remote_id,
        condominium_id=upload.condominium_id,
    )
    return dataclasses.replace(record, held_by=held_by, document=upload.document)


def held_published_record(
    upload: Upload, remote_id: str, sha256: str, held_by: str
) -> DocumentRecord:
    """An upload a held manifest caught already sent: on the partner, its withdrawal held."""
    record = published_record(upload, remote_id, sha256)
    return dataclasses.replace(record, status=DocStatus.DELETE_HELD, held_by=held_by)


def deleted_record(delete: Delete) -> StateRecord:
    """Written once the partner acknowledged a withdrawal."""
    return delete.leaves if delete.leaves is not None else Tombstone(delete.key)


_T = TypeVar("_T")


def run_to_end(steps: Generator[None, None, _T]) -> _T:
    """The value of a planning done in steps (a generator that pauses with ``yield`` so that a
    caller on an event loop can let other work run), run to its end at once."""
    while True:
        try:
            next(steps)
        except StopIteration as finished:
            result: _T = finished.value
            return result
