"""Turns planned operations into partner calls, one document at a time, without duplicates.

Operations on the same document run in the order they were planned (a chain per document key);
operations on different documents run concurrently under the scheduler, at most a window of
chains per partition (``window.py``), the rest waiting as the plan's items. An upload's content
is fetched and held (``ContentStage``) before its job takes a partner slot, so a slow store delays
only its own agency's documents. An upload writes its intent to the changelog before calling the
partner, and when a call's outcome is unknown (a retry after a timeout, or an intent found after
a restart) the document is looked up by its reference before anything is uploaded again. A
document sent again because that lookup found nothing owes late-copy checks: the partner may
still carry the first create out, so the document is looked up again on a schedule that its state
record keeps across restarts, and a second copy is withdrawn. Its failure paths are here too, in
one class: a document's own retries, parking, dead-lettering. The protocols of what it is given
(``RecordWriter``, ``ContentSource``, ``DeadLetters``) are declared here, and the composition
root passes the real objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from msgspec import UNSET

from consumer.core.events import Content
from consumer.core.planning.plan import (
    Delete,
    Lane,
    Operation,
    Upload,
    deleted_record,
    held_published_record,
    held_upload_record,
    intent_record,
    partner_sha256,
    published_record,
)
from consumer.core.records import SourceRecord
from consumer.core.state import (
    DocKey,
    DocStatus,
    DocumentRecord,
    LateCopyChecks,
    StateRecord,
    Tombstone,
)
from consumer.core.view import PublishedView
from consumer.errors import ContentError, PartnerRejectedError
from consumer.failures import Disposition, Scope, Verdict, classify
from consumer.metrics import RelayMetrics
from consumer.partner.answers import RemoteDocument
from consumer.partner.client import ChouetteCoproClient
from consumer.partner.scheduler import RetryPolicy, Scheduler
from consumer.partner.window import Batch, CopyCheck, Entry, Window, Withdrawal, entry_lane

log = logging.getLogger(__name__)

T = TypeVar("T")

DOCUMENT_RETRY = RetryPolicy(max_attempts=8, base_seconds=5.0, cap_seconds=300.0)
"""A document whose content cannot be had waits on its own (about 5 to 10 minutes in all),
then is parked; the agency's other documents flow meanwhile."""


DEFAULT_WINDOW = 64
"""Chains running at once per partition: room for every scheduler worker, a small bound."""

CHECK_BUSY_DELAY_S = 5.0
"""A late-copy check due while work on its document is queued or running waits this long again:
it never runs beside that work (nor in its chain, whose records it would overtake)."""

_CHECK_SOURCE = SourceRecord(
    topic="relay:late-copy-check",
    partition=-1,
    offset=-1,
    timestamp_ms=-1,
    key=None,
    value=None,
    headers=(),
)
"""The source of a late-copy check's batch: work the relay started itself, no input record."""


@dataclass(slots=True)
class _Tried:
    reached_partner: bool = False
    gone: bool = False  # an update found the document deleted by hand: it was created anew


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


@dataclass(slots=True)
class _Owed:
    """The late-copy checks a document owes in this process, and the timer of the next one."""

    checks: LateCopyChecks
    condominium_id: str
    timer: asyncio.TimerHandle | None


@dataclass(frozen=True, slots=True)
class RemoteState:
    """What the partner holds for one document, as far as the relay knows."""

    remote_id: str
    sha256: str


def _describe(error: Exception) -> str:
    if isinstance(error, ContentError):
        return f"{error.reason}: {error}"
    return str(error) or type(error).__name__


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
        document_retry: RetryPolicy = DOCUMENT_RETRY,
        window: int = DEFAULT_WINDOW,
        rng: random.Random | None = None,
        late_copy_checks: Sequence[float] = (),
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        """``late_copy_checks``: seconds after a document was sent again following an in-doubt
        create at which it is looked up again (``PARTNER__LATE_COPY_CHECKS_S``); empty, never.
        ``on_failure``: the relay's failure path, for what stops the relay in work the executor
        starts itself (a late-copy check), which no input record's batch carries."""
        self._view = view
        self._writer = writer
        self._scheduler = scheduler
        self._partner = partner
        self._content = content
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._retry = document_retry
        self._rng = rng or random.Random()  # noqa: S311 - backoff jitter, not cryptography
        self._look_first: set[DocKey] = set()
        self._late_schedule = tuple(late_copy_checks)
        self._clock = clock
        self._on_failure = on_failure
        self._owed: dict[DocKey, _Owed] = {}
        # The uploads queued or running per document, and those a held manifest stopped (with
        # its snapshot id): a hold reaches work already queued or running, not work planned later.
        self._uploads: dict[DocKey, list[Upload]] = {}
        self._inline_bytes = 0  # inline content of the uploads the window holds
        self._holding: dict[DocKey, tuple[list[Upload], str]] = {}
        self._window = Window(
            size=window,
            run=self._run,
            paused=lambda: scheduler.paused,
            finished=self._count_finished,
            backfill_paused=lambda: scheduler.backfill_paused,
        )
        self._backlog = {
            (lane, kind): metrics.backlog.labels(lane.value, kind)
            for lane in (Lane.LIVE, Lane.BACKFILL)
            for kind in ("upload", "delete")
        }

    @property
    def pending(self) -> int:
        """Operations not finished, of agencies that are not paused: what a drain waits for."""
        return self._window.pending(paused=False)

    def pending_in(self, lane: Lane) -> int:
        """Those of one lane: what back-pressure counts, each lane against its own bound."""
        return self._window.pending(paused=False, lane=lane)

    @property
    def late_copy_checks_owed(self) -> int:
        """Documents that owe late-copy checks (what ``/status`` shows)."""
        return len(self._owed)

    @property
    def held(self) -> int:
        """Operations of paused agencies: queued items, waited for by nothing until resumed."""
        return self._window.pending(paused=True)

    @property
    def inline_bytes(self) -> int:
        """Inline content (base64 text) held by the uploads queued or running, paused agencies'
        included: the memory a backlog of large inline PDFs takes."""
        return self._inline_bytes

    def submit(self, operations: Iterable[Operation], *, source: SourceRecord) -> Batch:
        """Queue ``operations`` (each behind earlier work on its document); ``Batch.future``
        completes once they all ended. The view shows their intended state at once, so the
        next plan sees work already queued."""
        entries: list[Entry] = []
        for operation in operations:
            if isinstance(operation, Upload):
                entries.append(operation)
                inline = _inline_size(operation)
                if inline:
                    self._inline_bytes += inline
                    self._metrics.queued_inline_bytes.inc(inline)
                self._uploads.setdefault(operation.key, []).append(operation)
                if self._view.is_unknown(operation.key):
                    # Its state record was unreadable: it may be on the partner already.
                    self._look_first.add(operation.key)
                self._view.apply(intent_record(operation))
            else:
                # What a withdrawal removes, kept to park it whole should the partner refuse it.
                entries.append(Withdrawal(operation, self._view.document(operation.key)))
                self._view.apply(deleted_record(operation))
            self._backlog[_backlog_label(entries[-1])].inc()
        return self._window.submit(entries, source=source)

    def mark(self, marks: Iterable[DocumentRecord]) -> None:
        """Hold or let go the uploads already queued (or running) for documents a held manifest
        decides; the view shows each mark at once.

        A held upload not sent yet is not sent: when its turn comes it records itself as
        waiting, with its document (``upload_held``). One already sent (or in doubt) goes on,
        and records itself as a held withdrawal. An ``uploading`` mark lets it go again.
        """
        for record in marks:
            self._view.apply(record)
            uploads = self._uploads.get(record.key)
            if record.status is DocStatus.UPLOAD_HELD and record.held_by and uploads:
                self._holding[record.key] = (list(uploads), record.held_by)
            else:
                self._holding.pop(record.key, None)

    def _held_by(self, upload: Upload) -> str | None:
        """The snapshot of the held manifest that stops ``upload``, if one does."""
        holding = self._holding.get(upload.key)
        if holding is None or not any(held is upload for held in holding[0]):
            return None
        return holding[1]

    def write_after(self, record: StateRecord) -> Awaitable[None]:
        """Write ``record`` once the work queued on its document is done (at once if none is)."""
        queued = self.queue_after(record)
        return queued if queued is not None else self._writer.write(record)

    def queue_after(self, record: StateRecord) -> asyncio.Future[None] | None:
        """Queue the write of ``record`` behind the work queued on its document, if any (None:
        nothing is queued, the caller writes it at once).

        A plan may replace the record of a document whose withdrawal or upload still waits for
        the partner (a newer manifest forgets a withdrawn document). Written at once, it would
        land before that work's own record, and a crash in between would leave the state topic
        saying the document is gone while the partner still holds it, or the reverse.
        """
        key = record.key
        if isinstance(key, DocKey):
            return self._window.after(key, functools.partial(self._writer.write, record))
        return None

    def resume(self) -> None:
        """The paused agencies changed: start what may run now."""
        self._window.pump()

    def schedule_late_copy_checks(self) -> int:
        """Schedule the late-copy checks the (restored) view owes; returns how many documents.

        Checks whose time passed while no relay ran are due at once.
        """
        scheduled = 0
        for record in self._view.late_copy_checks():
            if record.late_copy_checks is not None and record.condominium_id is not None:
                self._owe(record.key, record.late_copy_checks, record.condominium_id)
                scheduled += 1
        return scheduled

    async def cancel_all(self) -> None:
        for owed in self._owed.values():
            if owed.timer is not None:
                owed.timer.cancel()
        self._owed.clear()
        await self._window.cancel_all()
        self._uploads.clear()
        self._holding.clear()

    def _count_finished(self, entry: Entry) -> None:
        """The window ended ``entry`` (carried out, failed, or dropped): its backlog shrinks."""
        if not isinstance(entry, CopyCheck):
            self._backlog[_backlog_label(entry)].dec()
        if isinstance(entry, Upload) and (inline := _inline_size(entry)):
            self._inline_bytes -= inline
            self._metrics.queued_inline_bytes.dec(inline)

    async def _run(
        self, entry: Entry, source: SourceRecord, given: bool, previous: object
    ) -> object:
        if isinstance(entry, CopyCheck):
            await self._run_check(entry)
            return None
        operation = entry.delete if isinstance(entry, Withdrawal) else entry
        if given:
            base = previous if isinstance(previous, RemoteState) else None
        elif operation.remote_id is not None:
            sha = partner_sha256(operation) if isinstance(operation, Upload) else ""
            base = RemoteState(operation.remote_id, sha)
        else:
            base = None
        if isinstance(entry, Upload):
            return await self._run_upload(entry, base, source)
        await self._run_delete(entry.delete, base, entry.withdrawn)
        return None

    async def _run_upload(
        self, upload: Upload, base: RemoteState | None, source: SourceRecord
    ) -> RemoteState | None:
        try:
            return await self._run_upload_once(upload, base, source)
        finally:
            _forget(self._uploads, upload)
            holding = self._holding.get(upload.key)
            if holding is not None:
                _forget({upload.key: holding[0]}, upload)
                if not holding[0]:
                    del self._holding[upload.key]

    async def _run_upload_once(
        self, upload: Upload, base: RemoteState | None, source: SourceRecord
    ) -> RemoteState | None:
        lane = upload.lane.value
        sha = upload.document.content.sha256
        if base is not None and base.sha256 == sha:
            if (held_by := self._held_by(upload)) is not None:
                return await self._record_held(upload, base, base, held_by)
            self._metrics.operations.labels(lane, "upload", "skipped").inc()
            return base
        if (held_by := self._held_by(upload)) is not None and upload.key not in self._look_first:
            # Stopped before its bytes are fetched: nothing of it reached the partner.
            return await self._record_held(upload, base, None, held_by)
        scope = Scope.DOCUMENT if source.offset >= 0 else Scope.RELAY
        async with contextlib.AsyncExitStack() as hand:
            # The bytes first, in a slot of the agency's content stage held until the partner
            # job ends: no partner slot ever waits for a download.
            body = await self._held_content(upload, hand, scope=scope)
            result = (
                body
                if isinstance(body, _Failed)
                else await self._send_held(upload, base, body, scope)
            )
        if isinstance(result, _Failed):
            return await self._upload_failed(upload, base, source, result)
        held_by = self._held_by(upload)
        if result is None or held_by is not None:
            return await self._record_held(upload, base, result, held_by or "")
        record = self._owing(published_record(upload, result.remote_id, result.sha256))
        self._settle(upload.key, record)
        self._metrics.operations.labels(lane, "upload", "done").inc()
        if upload.lane is Lane.BACKFILL:
            self._metrics.first_publication_done.labels(upload.key.agency_id).inc()
        return result

    async def _send_held(
        self, upload: Upload, base: RemoteState | None, body: bytes, scope: Scope
    ) -> RemoteState | _Failed | None:
        """The upload's partner job, with its bytes in hand, through the scheduler."""
        # A document whose state record was unreadable may be on the partner already: look first.
        tried = _Tried(reached_partner=upload.key in self._look_first)
        self._look_first.discard(upload.key)

        async def call() -> RemoteState | None:
            return await self._attempt_upload(upload, base, tried, body)

        return await self._submit(
            call, agency_id=upload.key.agency_id, lane=upload.lane, scope=scope, key=upload.key
        )

    async def _record_held(
        self, upload: Upload, base: RemoteState | None, sent: RemoteState | None, held_by: str
    ) -> RemoteState | None:
        """An upload a held manifest caught: not sent, it waits with its document; sent
        already, the partner holds it and its withdrawal waits. What the partner holds is what
        the next operation on the document builds on."""
        if sent is None:
            remote_id = base.remote_id if base is not None else upload.remote_id
            record = held_upload_record(upload, held_by, remote_id)
            outcome = "held"
        else:
            record = self._owing(
                held_published_record(upload, sent.remote_id, sent.sha256, held_by)
            )
            outcome = "done"
        await self._writer.write(record)
        self._settle(upload.key, record)
        self._metrics.operations.labels(upload.lane.value, "upload", outcome).inc()
        return base if sent is None else sent

    async def _attempt_upload(
        self, upload: Upload, base: RemoteState | None, tried: _Tried, body: bytes
    ) -> RemoteState | None:
        """One attempt; the scheduler calls it again after a retriable failure. None: a held
        manifest stopped the upload before anything of it reached the partner."""
        if not tried.reached_partner and self._held_by(upload) is not None:
            return None
        sha = upload.document.content.sha256
        current = None if tried.gone else base
        looked_up = tried.reached_partner and current is None
        found = None
        if looked_up:
            # The last attempt may have reached the partner before failing (a create, also one
            # in place of a document deleted by hand): look before acting, or it is created
            # twice. The lookup is this attempt's first request; the upload after it needs its
            # own token.
            found = await self._one_copy(upload, await self._lookup(upload))
            if found is not None:
                current = RemoteState(found.remote_id, found.sha256 or "")
                if found.sha256 == sha:
                    await self._writer.write(
                        self._owing(published_record(upload, found.remote_id, sha))
                    )
                    return current
        intent = intent_record(upload)
        if current is not None:
            intent = dataclasses.replace(intent, remote_id=current.remote_id)
        await self._writer.write(intent)
        if looked_up:
            await self._scheduler.take_token(upload.key.agency_id)
        tried.reached_partner = True
        remote = await self._send(upload, current, body, tried)
        if looked_up and found is None and self._late_schedule:
            # Sent again as the lookup found nothing: the create in doubt may still be carried
            # out later than the partner was given, and leave a second copy.
            checks = LateCopyChecks(self._clock(), len(self._late_schedule))
            self._owe(upload.key, checks, upload.condominium_id)
        await self._writer.write(self._owing(published_record(upload, remote.remote_id, sha)))
        return RemoteState(remote.remote_id, sha)

    async def _send(
        self, upload: Upload, current: RemoteState | None, body: bytes, tried: _Tried
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
                tried.gone = True
                await self._scheduler.take_token(agency)
        return await self._partner.upload(
            agency_id=agency,
            condominium_id=upload.condominium_id,
            document=upload.document,
            content=body,
        )

    async def _run_delete(
        self, delete: Delete, base: RemoteState | None, withdrawn: DocumentRecord | None
    ) -> None:
        if base is not None:
            remote_id = base.remote_id

            async def call() -> None:
                await self._partner.delete(agency_id=delete.key.agency_id, remote_id=remote_id)

            result = await self._submit(
                call,
                agency_id=delete.key.agency_id,
                lane=Lane.LIVE,
                scope=Scope.RELAY,
                key=delete.key,
            )
            if isinstance(result, _Failed):
                await self._park_withdrawal(delete, base, withdrawn, result)
                return
        await self._writer.write(deleted_record(delete))
        self._settle(delete.key, deleted_record(delete))
        self._metrics.operations.labels(Lane.LIVE.value, "delete", "done").inc()

    async def _lookup(self, upload: Upload) -> list[RemoteDocument]:
        return await self._partner.find_all_by_reference(
            agency_id=upload.key.agency_id,
            condominium_id=upload.condominium_id,
            reference=upload.key.document_id,
        )

    def _settle(self, key: DocKey, record: StateRecord) -> None:
        """Apply a durable outcome to the view unless a later operation on the key is queued."""
        if not self._window.has_followers(key):
            self._view.apply(record)

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

    def _owing(self, record: DocumentRecord) -> DocumentRecord:
        """``record`` with the late-copy checks its document owes, so that they survive it."""
        owed = self._owed.get(record.key)
        if owed is None:
            return record
        return dataclasses.replace(record, late_copy_checks=owed.checks)

    def _owe(self, key: DocKey, checks: LateCopyChecks, condominium_id: str) -> None:
        """Set the timer of ``key``'s next late-copy check (none when none is left)."""
        earlier = self._owed.pop(key, None)
        if earlier is not None and earlier.timer is not None:
            earlier.timer.cancel()
        due = checks.due_at(self._late_schedule)
        if due is None:
            return
        delay = max(0.0, (due - self._clock()).total_seconds())
        timer = asyncio.get_running_loop().call_later(delay, self._check_due, key)
        self._owed[key] = _Owed(checks, condominium_id, timer)

    def _check_due(self, key: DocKey) -> None:
        """A late-copy check is due: it joins the window as partner work of its own (so the
        scheduler's tokens, breaker and the agency's pause apply), unless work on the document
        is queued or running: then it waits again, and never runs beside that work."""
        owed = self._owed.get(key)
        if owed is None:
            return
        if self._window.busy(key):
            owed.timer = asyncio.get_running_loop().call_later(
                CHECK_BUSY_DELAY_S, self._check_due, key
            )
            return
        owed.timer = None
        batch = self._window.submit([CopyCheck(key, owed.condominium_id)], source=_CHECK_SOURCE)
        batch.future.add_done_callback(self._check_ended)

    def _check_ended(self, done: asyncio.Future[None]) -> None:
        if done.cancelled():
            return  # the partition closed: the restored view owes the check still
        error = done.exception()
        if error is None:
            return
        # Only what stops the relay gets here (the changelog unreachable).
        if self._on_failure is not None:
            self._on_failure(error)
        else:
            log.error("late-copy check failed", exc_info=error)

    async def _run_check(self, check: CopyCheck) -> None:
        """Look ``check``'s document up and withdraw every copy the view does not record, then
        record what it still owes.

        It runs first in its document's chain, so the view says what the partner should hold:
        the view's copy stays, and any other copy with the relay's reference is one the partner
        made of an earlier create later than the relay waited. The lookup is one job of the
        scheduler; each withdrawal takes a token of its own.
        """
        key = check.key
        owed = self._owed.get(key)
        if owed is None:
            return
        record = self._view.document(key)
        if record is not None and record.status is DocStatus.UPLOADING:
            # An upload's outcome unknown: no copy to compare with (never so at a chain's head).
            owed.timer = asyncio.get_running_loop().call_later(
                CHECK_BUSY_DELAY_S, self._check_due, key
            )
            return
        keep = None if record is None else record.remote_id
        condominium = (record.condominium_id if record else None) or check.condominium_id
        agency = key.agency_id
        withdrawn: list[str] = []

        async def call() -> None:
            copies = await self._partner.find_all_by_reference(
                agency_id=agency, condominium_id=condominium, reference=key.document_id
            )
            for copy in copies:
                if copy.remote_id == keep:
                    continue
                await self._scheduler.take_token(agency)
                await self._partner.delete(agency_id=agency, remote_id=copy.remote_id)
                withdrawn.append(copy.remote_id)
                self._metrics.operations.labels(Lane.LIVE.value, "delete", "duplicate").inc()
                log.warning(
                    "withdrew a late copy of a document",
                    extra={
                        "key": key.encode().decode(),
                        "kept": keep,
                        "withdrawn": copy.remote_id,
                    },
                )

        result = await self._submit(
            call, agency_id=agency, lane=Lane.LIVE, scope=Scope.RELAY, key=key
        )
        if isinstance(result, _Failed):
            outcome = "failed"
            log.warning(
                "late-copy check could not be made",
                extra={
                    "key": key.encode().decode(),
                    "reason": result.verdict.reason,
                    "error": self._partner.redact(_describe(result.error)),
                },
            )
        else:
            outcome = "found" if withdrawn else "clean"
        self._metrics.late_copy_checks.labels(outcome).inc()
        left = owed.checks.after_one()
        if self._owed.get(key) is owed:
            del self._owed[key]
            if left is not None:
                self._owe(key, left, owed.condominium_id)
        if record is not None and record.late_copy_checks != left:
            updated = dataclasses.replace(record, late_copy_checks=left)
            await self._writer.write(updated)
            self._settle(key, updated)

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


def _inline_size(upload: Upload) -> int:
    inline = upload.document.content.inline_base64
    return 0 if inline is UNSET else len(inline)


def _forget(uploads: dict[DocKey, list[Upload]], upload: Upload) -> None:
    """Take ``upload`` (this very one) out of its document's list; drop the list once empty."""
    queued = uploads.get(upload.key)
    if queued is None:
        return
    queued[:] = [other for other in queued if other is not upload]
    if not queued:
        del uploads[upload.key]


def _backlog_label(entry: Entry) -> tuple[Lane, str]:
    return entry_lane(entry), "delete" if isinstance(entry, Withdrawal) else "upload"
