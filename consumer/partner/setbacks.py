"""What the executor does when a document's work fails: it waits on its own, is parked or
dead-lettered, the view and changelog say what the partner holds after a refusal, and copies
left by a request thought lost are withdrawn.

``DocumentSetbacks`` is the executor's half that handles failures (``OperationExecutor`` inherits
it); the collaborators' protocols and ``RemoteState`` live here so both halves share them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from consumer.core.events import Content
from consumer.core.planning.plan import Delete, Lane, Upload, intent_record
from consumer.core.records import SourceRecord
from consumer.core.state import DocKey, DocStatus, DocumentRecord, StateRecord, Tombstone
from consumer.errors import ContentError
from consumer.failures import Disposition, Scope, Verdict, classify
from consumer.metrics import RelayMetrics
from consumer.partner.answers import RemoteDocument
from consumer.partner.client import ChouetteCoproClient
from consumer.partner.scheduler import RetryPolicy, Scheduler

log = logging.getLogger("consumer.partner.executor")  # the executor's log, as before the split

T = TypeVar("T")


class RecordWriter(Protocol):
    """Writes state records: ``write`` waits for room and the acknowledgement; ``submit``
    queues one and returns the future of its acknowledgement; ``room`` waits until the queue
    has room (back-pressure for those that only submit)."""

    async def write(self, record: StateRecord) -> None: ...

    def submit(self, record: StateRecord) -> asyncio.Future[None]: ...

    async def room(self) -> None: ...


class ContentSource(Protocol):
    """The content stage: a document's bytes, held in a slot of its agency for the block."""

    def hold(
        self, agency_id: str, content: Content, *, lane: Lane
    ) -> contextlib.AbstractAsyncContextManager[bytes]: ...


class DeadLetters(Protocol):
    """Where rejected input goes; the composition root passes the Kafka dead-letter sink."""

    async def send(self, source: SourceRecord, *, reason: str, detail: str) -> None: ...


@dataclass(frozen=True, slots=True)
class _Failed:
    """Work that ended without success, and what ``classify`` says about it."""

    verdict: Verdict
    error: Exception


@dataclass(frozen=True, slots=True)
class RemoteState:
    """What the partner holds for one document, as far as the relay knows."""

    remote_id: str
    sha256: str


class DocumentSetbacks:
    """The failure paths of ``OperationExecutor``: a document's own retries, parking and
    dead-lettering. The executor provides the collaborators and ``_settle``."""

    _writer: RecordWriter
    _scheduler: Scheduler
    _partner: ChouetteCoproClient
    _content: ContentSource
    _dead_letters: DeadLetters
    _metrics: RelayMetrics
    _retry: RetryPolicy
    _rng: random.Random

    def _settle(self, key: DocKey, record: StateRecord) -> None:
        raise NotImplementedError

    async def _one_copy(self, upload: Upload, found: list[RemoteDocument]) -> RemoteDocument | None:
        """The copy to keep of those a lookup found, the others withdrawn.

        Copies come from a request the relay thought lost that the partner carried out later
        than ``PARTNER__IN_DOUBT_SETTLE_S``. They carry the relay's reference, so they are the
        relay's own: the one with this upload's content stays (else the first), each other one
        is withdrawn, a request with a token of its own.
        """
        if len(found) < 2:
            return found[0] if found else None
        sha = upload.document.content.sha256
        keep = next((copy for copy in found if copy.sha256 == sha), found[0])
        agency = upload.key.agency_id
        for copy in found:
            if copy is keep:
                continue
            await self._scheduler.take_token(agency)
            await self._partner.delete(agency_id=agency, remote_id=copy.remote_id)
            self._metrics.operations.labels(upload.lane.value, "delete", "duplicate").inc()
            log.warning(
                "withdrew a second copy of a document",
                extra={
                    "key": upload.key.encode().decode(),
                    "kept": keep.remote_id,
                    "withdrawn": copy.remote_id,
                },
            )
        return keep

    async def _submit(
        self,
        call: Callable[[], Awaitable[T]],
        *,
        agency_id: str,
        lane: Lane,
        scope: Scope,
        key: DocKey,
    ) -> T | _Failed:
        """Run ``call`` through the scheduler; a failure comes back with its verdict.

        The scheduler retries what the partner may answer better later. A failure that is not
        the partner's comes back at once and this document waits on its own (``_waited``).
        Infrastructure failures are raised: they stop the relay.
        """
        attempt = 0
        while True:
            try:
                return await self._scheduler.submit(call, agency_id=agency_id, lane=lane)
            except Exception as error:  # classify() decides; this only routes
                verdict = classify(error, scope)
                if verdict.disposition is Disposition.FATAL:
                    raise
                attempt += 1
                if not await self._waited(verdict, error, key=key, attempt=attempt):
                    return _Failed(verdict, error)

    async def _held_content(
        self, upload: Upload, hand: contextlib.AsyncExitStack, *, scope: Scope
    ) -> bytes | _Failed:
        """The upload's bytes, held in ``hand`` (a slot of its agency's content stage) until
        the caller closes it; fetched before any partner slot is taken.

        A store that cannot serve them now makes this document wait on its own (``_waited``),
        without a slot, so the agency's other documents are fetched meanwhile.
        """
        agency, content = upload.key.agency_id, upload.document.content
        attempt = 0
        while True:
            try:
                held = self._content.hold(agency, content, lane=upload.lane)
                return await hand.enter_async_context(held)
            except Exception as error:  # classify() decides; this only routes
                verdict = classify(error, scope)
                if verdict.disposition is Disposition.FATAL:
                    raise
                attempt += 1
                if not await self._waited(verdict, error, key=upload.key, attempt=attempt):
                    return _Failed(verdict, error)

    async def _waited(
        self, verdict: Verdict, error: Exception, *, key: DocKey, attempt: int
    ) -> bool:
        """Wait before the document's next attempt after ``error``; False when there is none.

        What is retriable but not for the partner to mend (the document store unavailable)
        waits here, bounded, jittered and counted, outside the scheduler's workers and without
        a content slot, so the agency's other documents flow meanwhile. What is final, or still
        failing after the document's attempts, has no next attempt.
        """
        if verdict.disposition is not Disposition.RETRY or attempt >= self._retry.max_attempts:
            return False
        delay = self._retry.delay(attempt, self._rng)
        self._metrics.document_retries.labels(verdict.reason).inc()
        log.warning(
            "document waits before trying again",
            extra={
                "key": key.encode().decode(),
                "reason": verdict.reason,
                "attempt": attempt,
                "delay_s": round(delay, 3),
                "error": self._partner.redact(_describe(error)),
            },
        )
        await asyncio.sleep(delay)
        return True

    async def _upload_failed(
        self, upload: Upload, base: RemoteState | None, source: SourceRecord, failed: _Failed
    ) -> RemoteState | None:
        """Dead-letter the input that can never work, or park the document for an operator."""
        verdict = failed.verdict
        detail = self._explain(failed, upload.key)
        if verdict.disposition is not Disposition.DEAD_LETTER:
            # Parked, or still unavailable once its own retries are spent.
            return await self._park(upload, base, f"{verdict.reason}: {detail}")
        await self._dead_letters.send(
            source, reason=verdict.reason, detail=f"document {upload.key.document_id}: {detail}"
        )
        await self._writer.write(self._revert(upload, base))
        self._settle(upload.key, self._revert(upload, base))
        self._metrics.operations.labels(upload.lane.value, "upload", "dead_lettered").inc()
        return base

    def _explain(self, failed: _Failed, key: DocKey) -> str:
        """The failure's redacted detail; an unforeseen one is logged with its traceback."""
        detail = self._partner.redact(_describe(failed.error))
        if not failed.verdict.expected:
            self._metrics.unexpected_errors.labels("document").inc()
            log.error(
                "unexpected error in a document's work; the document is parked",
                exc_info=failed.error,
                extra={"key": key.encode().decode(), "reason": failed.verdict.reason},
            )
        return detail

    async def _park(self, upload: Upload, base: RemoteState | None, why: str) -> RemoteState | None:
        """Keep the document (whole) until an operator fixes what stops it; counted and logged."""
        parked = dataclasses.replace(
            intent_record(upload),
            status=DocStatus.PARKED,
            parked_reason=why,
            document=upload.document,
            remote_id=base.remote_id if base else None,
        )
        await self._writer.write(parked)
        self._settle(upload.key, parked)
        self._metrics.operations.labels(upload.lane.value, "upload", "parked").inc()
        log.error("document parked", extra={"key": upload.key.encode().decode(), "why": why})
        return base

    async def _park_withdrawal(
        self,
        delete: Delete,
        base: RemoteState,
        withdrawn: DocumentRecord | None,
        failed: _Failed,
    ) -> None:
        """A withdrawal the partner refuses waits for an operator; the manifest goes on.

        The parked record names the partner's document (``remote_id``) and carries no document:
        retrying parked work withdraws it (``planning.actions.retry_parked``).
        """
        why = f"{failed.verdict.reason}: {self._explain(failed, delete.key)}"
        key = delete.key.encode().decode()
        if withdrawn is None:  # never planned so; kept loud rather than guessed
            log.error("withdrawal refused and nothing to park", extra={"key": key, "why": why})
            return
        parked = dataclasses.replace(
            withdrawn,
            status=DocStatus.PARKED,
            sha256=base.sha256 or withdrawn.sha256,
            remote_id=base.remote_id,
            condominium_id=delete.condominium_id or withdrawn.condominium_id,
            held_by=None,
            parked_reason=why,
            document=None,
        )
        await self._writer.write(parked)
        self._settle(delete.key, parked)
        self._metrics.operations.labels(Lane.LIVE.value, "delete", "parked").inc()
        log.error("withdrawal parked", extra={"key": key, "why": why})

    def _revert(self, upload: Upload, base: RemoteState | None) -> StateRecord:
        """The record that describes the partner's state after a refused upload: unchanged."""
        if base is None:
            return Tombstone(upload.key)
        return dataclasses.replace(
            intent_record(upload),
            status=DocStatus.PUBLISHED,
            remote_id=base.remote_id,
            sha256=base.sha256,
        )


def _describe(error: Exception) -> str:
    if isinstance(error, ContentError):
        return f"{error.reason}: {error}"
    return str(error) or type(error).__name__
