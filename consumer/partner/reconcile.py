"""Recovery of upload intents whose outcome is unknown after a restart.

An ``uploading`` record in a restored view means the relay stopped between writing the intent and
writing the result. Before any input of the partition is processed, each such document is looked
up on the partner by its reference: found means published (with the sha256 the partner reports),
absent means not uploaded yet (the intent is removed and the input, read again, uploads it once).
A request the stopped relay had sent may still be carried out for a while: the lookups wait until
the partner is surely done with it. A partner slower still may carry it out after that, so the
upload of an absent document looks it up once more and, finding nothing again, owes late-copy
checks (``OperationExecutor``).

An agency whose first publication an operator paused (``pause --backfill-only``) has nothing of
its backfill reach the partner, lookups included, while its live documents flow: its intents are
not looked up now but forgotten as unknown, as an unreadable state record is. The input, read
again, plans each such upload anew; its first attempt looks the document up before sending,
in the upload's own lane, so a backfill's waits for the resume and a live one's goes at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Collection

from consumer.core.state import DocStatus, DocumentRecord, StateRecord, Tombstone
from consumer.core.view import PublishedView
from consumer.failures import Disposition, Scope, classify
from consumer.partner.client import ChouetteCoproClient
from consumer.partner.executor import RecordWriter
from consumer.partner.scheduler import Lane, Scheduler

log = logging.getLogger(__name__)


async def reconcile_partition(
    *,
    view: PublishedView,
    writer: RecordWriter,
    scheduler: Scheduler,
    partner: ChouetteCoproClient,
    not_before: float = 0.0,
    deferred: Collection[str] = (),
) -> int:
    """Settle every intent of ``view`` with the partner; returns how many were settled.

    The intents of the agencies in ``deferred`` (first publication paused) are forgotten as
    unknown instead, in the view only (the state topic keeps them until the upload is done):
    their next upload looks first.

    ``not_before`` (seconds since the epoch): an upload the stopped relay sent may still be
    carried out until then (its timeout, then ``PARTNER__IN_DOUBT_SETTLE_S``), and a lookup
    before it would miss it; the lookups wait for it.
    """
    intents = list(view.with_status(DocStatus.UPLOADING))
    if not intents:
        return 0
    later = [intent for intent in intents if intent.key.agency_id in deferred]
    if (wait := not_before - time.time()) > 0:
        log.info(
            "waiting for uploads in doubt to settle",
            extra={"intents": len(intents), "seconds": round(wait, 1)},
        )
        await asyncio.sleep(wait)
    if later:
        for intent in later:
            view.forget_unreadable(intent.key.encode())  # unknown: the next upload looks first
        log.info(
            "upload intents of paused first publications looked up when their upload goes",
            extra={"intents": len(later), "agencies": sorted({i.key.agency_id for i in later})},
        )
        intents = [intent for intent in intents if intent.key.agency_id not in deferred]
        if not intents:
            return 0

    async def settle(intent: DocumentRecord) -> None:
        async def look_up() -> StateRecord:
            if intent.condominium_id is None:
                return Tombstone(intent.key)
            copies = await partner.find_all_by_reference(
                agency_id=intent.key.agency_id,
                condominium_id=intent.condominium_id,
                reference=intent.key.document_id,
            )
            if not copies:
                return Tombstone(intent.key)
            found = next((c for c in copies if c.sha256 == intent.sha256), copies[0])
            if len(copies) > 1:
                # A lookup sends nothing: the next upload of the document, or an audit's
                # repair, withdraws the other copies.
                log.warning(
                    "the partner holds copies of a document",
                    extra={
                        "key": intent.key.encode().decode(),
                        "kept": found.remote_id,
                        "copies": [c.remote_id for c in copies],
                    },
                )
            return dataclasses.replace(
                intent,
                status=DocStatus.PUBLISHED,
                remote_id=found.remote_id,
                sha256=found.sha256 or intent.sha256,
            )

        try:
            # A lookup sends nothing: it goes even while an operator pauses the agency.
            record = await scheduler.submit(
                look_up, agency_id=intent.key.agency_id, lane=Lane.LIVE, gated=False
            )
        except Exception as exc:  # classify() decides; only infrastructure is raised again
            verdict = classify(exc, Scope.RELAY)
            if verdict.disposition is Disposition.FATAL:
                raise
            # Credentials or rights are wrong, or a surprise: keep the intent, which is settled
            # after the fix (the next restart); the partition goes on meanwhile.
            log.error(  # noqa: TRY400 - a traceback for surprises only, not for refusals
                "cannot reconcile upload intent",
                exc_info=exc if not verdict.expected else None,
                extra={
                    "key": intent.key.encode().decode(),
                    "reason": verdict.reason,
                    "error": partner.redact(str(exc)),
                },
            )
            return
        await writer.write(record)
        view.apply(record)
        if isinstance(record, Tombstone):
            view.doubt(intent.key)

    await asyncio.gather(*(settle(intent) for intent in intents))
    log.info("upload intents reconciled", extra={"intents": len(intents)})
    return len(intents)
