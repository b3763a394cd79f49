"""The partner's copies of documents, looked up by reference: what a repair checks before it acts.

A repair command names what an audit saw; the replica that carries it out asks the partner again,
one lookup per reference in the building's condominium, at the agency's pace (each lookup is a
job of the scheduler taking one of the agency's tokens). A lookup sends nothing, so it goes while
the agency is paused. A reference the partner could not be asked about is left out of the answer:
its findings are not confirmed, and the repair leaves them alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping

from consumer.failures import Disposition, Scope, classify
from consumer.partner.answers import RemoteDocument
from consumer.partner.client import ChouetteCoproClient
from consumer.partner.scheduler import Lane, Scheduler

log = logging.getLogger(__name__)


async def find_copies(
    *,
    scheduler: Scheduler,
    partner: ChouetteCoproClient,
    agency_id: str,
    condominium_id: str,
    references: Iterable[str],
) -> Mapping[str, list[RemoteDocument]]:
    """The copies the partner holds in ``condominium_id`` of each reference (LSC document id);
    a reference whose lookup failed is not in the answer. Only infrastructure is raised."""

    async def look_up(reference: str) -> tuple[str, list[RemoteDocument]] | None:
        async def call() -> list[RemoteDocument]:
            return await partner.find_all_by_reference(
                agency_id=agency_id, condominium_id=condominium_id, reference=reference
            )

        try:
            copies = await scheduler.submit(call, agency_id=agency_id, lane=Lane.LIVE, gated=False)
        except Exception as exc:  # classify() decides; only infrastructure is raised again
            verdict = classify(exc, Scope.RELAY)
            if verdict.disposition is Disposition.FATAL:
                raise
            log.error(  # noqa: TRY400 - a traceback for surprises only, not for refusals
                "repair: a finding cannot be checked with the partner, it is left alone",
                exc_info=exc if not verdict.expected else None,
                extra={
                    "agency": agency_id,
                    "condominium": condominium_id,
                    "reference": reference,
                    "reason": verdict.reason,
                    "error": partner.redact(str(exc)),
                },
            )
            return None
        return reference, copies

    answers = await asyncio.gather(*(look_up(r) for r in sorted(set(references))))
    return dict(answer for answer in answers if answer is not None)
