"""Turns planned operations into partner calls, one document at a time, without duplicates.

Operations on the same document run in the order they were planned (a chain per document key);
operations on different documents run concurrently under the scheduler. An upload writes its
intent to the changelog before calling the partner, and when a call's outcome is unknown (a retry
after a timeout, or an intent found after a restart) the document is looked up by its reference
before anything is uploaded again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Protocol

from consumer.core.events import Content
from consumer.core.planner import (
    Delete,
    Lane,
    Upload,
    deleted_record,
    intent_record,
    published_record,
)
from consumer.core.records import SourceRecord
from consumer.core.state import DocKey, DocStatus, StateRecord, Tombstone
from consumer.core.view import PublishedView
from consumer.errors import ContentError, PartnerParkedError, PartnerRejectedError
from consumer.metrics import RelayMetrics
from consumer.partner.client import ChouetteCoproClient, RemoteDocument
from consumer.partner.scheduler import Scheduler

log = logging.getLogger(__name__)

Operation = Upload | Delete


class RecordWriter(Protocol):
    async def write(self, record: StateRecord) -> None: ...


class ContentSource(Protocol):
    async def fetch(self, content: Content) -> bytes: ...


class DeadLetters(Protocol):
    """Where rejected input goes; the composition root passes the Kafka dead-letter sink."""

    async def send(self, source: SourceRecord, *, reason: str, detail: str) -> None: ...


@dataclass(slots=True)
class _Tried:
    reached_partner: bool = False


@dataclass(frozen=True, slots=True)
class RemoteState:
    """What the partner holds for one document, as far as the relay knows."""

    remote_id: str
    sha256: str


class OperationExecutor:
    """Runs the partner operations of one partition and keeps its view in step with the results."""

    def __init__(
        self,
        *,
        view: PublishedView,
        writer: RecordWriter,
        scheduler: Scheduler,
        partner: ChouetteCoproClient,
        content: ContentSource,
        dead_letters: DeadLetters,
        metrics: RelayMetrics,
    ) -> None:
        self._view = view
        self._writer = writer
        self._scheduler = scheduler
        self._partner = partner
        self._content = content
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._chains: dict[DocKey, asyncio.Task[RemoteState | None]] = {}
        # Every unfinished operation, not only chain heads: closing must stop them all.
        self._running: set[asyncio.Task[RemoteState | None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._chains)

    def submit(
        self, operation: Operation, *, source: SourceRecord
    ) -> asyncio.Task[RemoteState | None]:
        """Queue ``operation`` behind any earlier one on the same document; return its task."""
        key = operation.key
        previous = self._chains.get(key)
        task = asyncio.create_task(
            self._run(operation, previous, source), name=f"op:{key.encode()!r}"
        )
        self._chains[key] = task
        self._running.add(task)
        lane = operation.lane if isinstance(operation, Upload) else Lane.LIVE
        kind = "upload" if isinstance(operation, Upload) else "delete"
        backlog = self._metrics.backlog.labels(lane.value, kind)
        backlog.inc()

        def finished(done: asyncio.Task[RemoteState | None]) -> None:
            backlog.dec()
            self._running.discard(done)
            if self._chains.get(key) is done:
                del self._chains[key]

        task.add_done_callback(finished)
        # The view shows the intended state at once, so the next plan sees work already queued.
        if isinstance(operation, Upload):
            self._view.apply(intent_record(operation))
        else:
            self._view.apply(deleted_record(operation))
        return task

    async def cancel_all(self) -> None:
        tasks = list(self._running)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(
        self,
        operation: Operation,
        previous: asyncio.Task[RemoteState | None] | None,
        source: SourceRecord,
    ) -> RemoteState | None:
        if previous is not None:
            base = await previous
        elif operation.remote_id is not None:
            sha = (
                operation.previous.sha256
                if isinstance(operation, Upload) and operation.previous
                else ""
            )
            base = RemoteState(operation.remote_id, sha)
        else:
            base = None
        if isinstance(operation, Upload):
            return await self._run_upload(operation, base, source)
        await self._run_delete(operation, base)
        return None

    async def _run_upload(
        self, upload: Upload, base: RemoteState | None, source: SourceRecord
    ) -> RemoteState | None:
        lane = upload.lane.value
        sha = upload.document.content.sha256
        if base is not None and base.sha256 == sha:
            self._metrics.operations.labels(lane, "upload", "skipped").inc()
            return base
        tried = _Tried()

        async def call() -> RemoteState:
            return await self._attempt_upload(upload, base, tried)

        try:
            result: RemoteState | None = await self._scheduler.submit(
                call, agency_id=upload.key.agency_id, lane=upload.lane
            )
        except (PartnerRejectedError, ContentError) as exc:
            if isinstance(exc, ContentError):
                reason, detail = "content_rejected", f"{exc.reason}: {exc}"
            else:
                reason, detail = "partner_rejected", str(exc)
            if source.offset < 0:
                # Work the relay started itself (a parked document sent again): there is no input
                # record to dead-letter, so the document stays parked with the refusal.
                return await self._park(upload, base, f"{reason}: {detail}")
            await self._dead_letters.send(
                source, reason=reason, detail=f"document {upload.key.document_id}: {detail}"
            )
            await self._writer.write(self._revert(upload, base))
            self._settle(upload.key, self._revert(upload, base))
            self._metrics.operations.labels(lane, "upload", "dead_lettered").inc()
            return base
        except PartnerParkedError as exc:
            return await self._park(upload, base, f"partner: {exc}")
        if result is not None:
            self._settle(upload.key, published_record(upload, result.remote_id, result.sha256))
        self._metrics.operations.labels(lane, "upload", "done").inc()
        if upload.lane is Lane.BACKFILL:
            self._metrics.first_publication_done.labels(upload.key.agency_id).inc()
        return result

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

    async def _attempt_upload(
        self, upload: Upload, base: RemoteState | None, tried: _Tried
    ) -> RemoteState:
        """One attempt; the scheduler calls it again after a retriable failure."""
        sha = upload.document.content.sha256
        current = base
        if tried.reached_partner and current is None:
            # The last attempt may have reached the partner before failing: look before acting.
            # The lookup is this attempt's first request; the upload after it needs its own token.
            found = await self._lookup(upload)
            if found is not None:
                current = RemoteState(found.remote_id, found.sha256 or "")
                if found.sha256 == sha:
                    await self._writer.write(published_record(upload, found.remote_id, sha))
                    return current
        body = await self._content.fetch(upload.document.content)
        intent = intent_record(upload)
        if current is not None:
            intent = dataclasses.replace(intent, remote_id=current.remote_id)
        await self._writer.write(intent)
        if tried.reached_partner and base is None:
            await self._scheduler.take_token(upload.key.agency_id)
        tried.reached_partner = True
        remote = await self._send(upload, current, body)
        await self._writer.write(published_record(upload, remote.remote_id, sha))
        return RemoteState(remote.remote_id, sha)

    async def _send(
        self, upload: Upload, current: RemoteState | None, body: bytes
    ) -> RemoteDocument:
        agency = upload.key.agency_id
        if current is not None:
            try:
                return await self._partner.update(
                    agency_id=agency,
                    remote_id=current.remote_id,
                    document=upload.document,
                    content=body,
                )
            except PartnerRejectedError as exc:
                if exc.status != 404:
                    raise
                # Deleted by hand on the partner's side: publish it again as a new document,
                # a second request of this attempt, with a token of its own.
                await self._scheduler.take_token(agency)
        return await self._partner.upload(
            agency_id=agency,
            condominium_id=upload.condominium_id,
            document=upload.document,
            content=body,
        )

    async def _run_delete(self, delete: Delete, base: RemoteState | None) -> None:
        if base is not None:

            async def call() -> None:
                await self._partner.delete(agency_id=delete.key.agency_id, remote_id=base.remote_id)

            await self._scheduler.submit(call, agency_id=delete.key.agency_id, lane=Lane.LIVE)
        await self._writer.write(deleted_record(delete))
        self._settle(delete.key, deleted_record(delete))
        self._metrics.operations.labels(Lane.LIVE.value, "delete", "done").inc()

    async def _lookup(self, upload: Upload) -> RemoteDocument | None:
        return await self._partner.find_by_reference(
            agency_id=upload.key.agency_id,
            condominium_id=upload.condominium_id,
            reference=upload.key.document_id,
        )

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

    def _settle(self, key: DocKey, record: StateRecord) -> None:
        """Apply a durable outcome to the view unless a later operation on the key is queued."""
        current = asyncio.current_task()
        if self._chains.get(key) is current:
            self._view.apply(record)
