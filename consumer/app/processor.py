"""Processing of one input partition number: decode, plan, record, execute, mark offsets done.

A ``PartitionProcessor`` owns the published view of its partition, the manifest assembler, the
offset trackers of both input topics and the executor. ``handle`` only plans and enqueues; the
offset of a record becomes committable when every state record and partner operation it caused
is acknowledged. It is also where the clock meets the pure core: events dated beyond the clock
plus the allowed skew are dead-lettered, and incomplete snapshots expire by their records' time.
One class: its manifests (parts assembled, applied, held for approval, expired), the completion of
a plan's work (records, operations, the building record last, then the offsets) and repairs (a
task of their own that checks each finding on the partner) read in one place.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

from consumer.core.audit import Copies, Resend, to_resend
from consumer.core.commands import (
    AgencyAction,
    HeldAction,
    OperatorCommand,
    Refusal,
    decode_command,
    mac_refusal,
)
from consumer.core.controls import CONTROLS, approval_refusal, plan_agency_command, refusal
from consumer.core.deadletter import ProcessingReason
from consumer.core.decoding import Poison, claimed_snapshot, decode_record
from consumer.core.events import DocumentCreated, ManifestSnapshot
from consumer.core.guard import DeletionGuard
from consumer.core.manifest import (
    AssemblyOutcome,
    CompleteManifest,
    DroppedSnapshot,
    ManifestAssembler,
)
from consumer.core.offsets import OffsetTracker
from consumer.core.outcomes import (
    CommandOutcome,
    carried_out_outcome,
    is_outcome,
    refusal_outcome,
)
from consumer.core.planning.actions import discard_held, release_held, retry_parked
from consumer.core.planning.documents import plan_document
from consumer.core.planning.first_publication import unapproved_modules
from consumer.core.planning.manifests import plan_manifest_in_steps
from consumer.core.planning.plan import Lane, Outcome, Plan, Upload
from consumer.core.records import SourceRecord
from consumer.core.routing import RoutingTable
from consumer.core.state import ON_PARTNER, BuildingRecord, DocKey, DocStatus, StateRecord
from consumer.core.view import PublishedView
from consumer.failures import Disposition, Scope, classify
from consumer.kafka.deadletters import DeadLetterSink
from consumer.metrics import RelayMetrics
from consumer.partner.executor import OperationExecutor, RecordWriter
from consumer.partner.window import Batch

__all__ = [
    "COMMANDS",
    "DOCUMENTS",
    "MANIFESTS",
    "FindCopies",
    "FindResend",
    "PartitionProcessor",
    "RefusedCommand",
    "WriteOutcome",
]

log = logging.getLogger(__name__)

DOCUMENTS = "document-created"
DECIDED_BY_MANIFEST = frozenset({Outcome.SUPERSEDED, Outcome.WAITING})
"""Outcomes of a document-created event that a manifest of its building decided."""
COMMANDS = "operator-command"
CARRIED_OUT = "carried_out"  # commands_total's outcome besides the refusals and dead_lettered
UNREADABLE = "unreadable"  # commands_total's kind of a command record that is not one
REFUSALS_KEPT = 20


class RefusedCommand(NamedTuple):
    """A command the replica refused, as ``/status`` shows it."""

    at: dt.datetime
    partition: int
    command: OperatorCommand
    refusal: Refusal


DecidedWait = tuple[tuple[str, str], list[tuple[str, int]], asyncio.Future[Any]]

"""A wait for a building's work: the building, the offsets it releases, the wait itself."""

# A plan's records written together: one chunk's acknowledgements awaited at a time.
WRITE_CHUNK = 500
# A plan's records applied to the view between two pauses of a large plan (about 10 ms).
APPLY_STEP = 5_000

_Applied = tuple[list[Awaitable[object]], list[StateRecord], list[BuildingRecord]]
"""A plan's records applied to the view, their writes sorted: queued behind their document's
work, to write at once, deferred (building records)."""

_T = TypeVar("_T")


async def _in_steps(steps: Generator[None, None, _T]) -> _T:
    """Run ``steps`` to its end, letting the event loop run other work at each pause."""
    while True:
        try:
            next(steps)
        except StopIteration as finished:
            result: _T = finished.value
            return result
        await asyncio.sleep(0)


async def _write_all(writer: RecordWriter, records: list[StateRecord]) -> None:
    """Write ``records`` in order, a chunk at a time: a plan of any size (a 100,000-item
    manifest) costs one chunk of waiting writes, not a task per record."""
    for start in range(0, len(records), WRITE_CHUNK):
        await asyncio.gather(*(writer.write(r) for r in records[start : start + WRITE_CHUNK]))


def _all_of(futures: list[asyncio.Future[None]]) -> asyncio.Future[None]:
    """One future that ends when all of ``futures`` have (failed as the first failure)."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    _chain(asyncio.gather(*futures), done)
    return done


MANIFESTS = "manifest-snapshot"

_REFUSED_PARTS = {
    AssemblyOutcome.TOO_LARGE: (
        ProcessingReason.MANIFEST_TOO_LARGE,
        "the snapshot declares more items than CHOUETTE_RELAY_MANIFEST__MAX_PENDING_ITEMS allows"
        " to hold while it is assembled",
    ),
    AssemblyOutcome.INCONSISTENT: (
        ProcessingReason.INCONSISTENT_PARTS,
        "the part contradicts the parts of its snapshot already read (header, or the same part"
        " number with other items); the snapshot is dropped",
    ),
}

"""Assembly outcomes that make the part itself a dead letter."""


FindResend = Callable[
    [Mapping[str, tuple[str, int]], tuple[str, str], frozenset[str]],
    Awaitable[Mapping[str, Resend]],
]

"""Reads the partition's input again up to the given offsets, for a repair's documents."""

FindCopies = Callable[[str, str, frozenset[str]], Awaitable[Copies]]

"""Looks references up on the partner (agency, condominium, references): each one's copies, a
reference that could not be looked up left out."""

WriteOutcome = Callable[[CommandOutcome], asyncio.Future[None]]
"""Writes a command's outcome record; the future ends once the broker acknowledged it."""

_INPUT_KINDS = ("document-created", "manifest-snapshot")


class PartitionProcessor:
    """Everything the relay does for input partition number ``partition``."""

    def __init__(
        self,
        *,
        partition: int,
        topics: dict[str, str],
        view: PublishedView,
        assembler: ManifestAssembler,
        routing: RoutingTable,
        guard: DeletionGuard,
        executor: OperationExecutor,
        writer: RecordWriter,
        dead_letters: DeadLetterSink,
        metrics: RelayMetrics,
        max_value_bytes: int,
        clock: Callable[[], dt.datetime],
        on_failure: Callable[[BaseException], None],
        max_clock_skew: dt.timedelta = dt.timedelta(minutes=5),
        on_command: Callable[[AgencyAction], None] = lambda _: None,
        find_resend: FindResend | None = None,
        find_copies: FindCopies | None = None,
        command_key: bytes | None = None,
        write_outcome: WriteOutcome | None = None,
    ) -> None:
        self.partition = partition
        self.view = view
        self._kinds = {topic: kind for kind, topic in topics.items()}
        self._trackers = {topic: OffsetTracker() for topic in topics.values()}
        self._assembler = assembler
        self._routing = routing
        self._guard = guard
        self._executor = executor
        self._writer = writer
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._max_value_bytes = max_value_bytes
        self._clock = clock
        self._max_clock_skew = max_clock_skew
        self._on_failure = on_failure
        # An agency command was read: the relay re-reads the paused agencies (after it is
        # applied) or reloads the API keys (before parked documents are sent again).
        self._on_command = on_command
        self._find_resend = find_resend
        self._find_copies = find_copies  # a repair's findings, looked up on the partner
        # With a key, only commands signed with it are carried out (the commands topic may be
        # written by producers that operators do not control).
        self._command_key = command_key
        # Where the decision on each command goes back to the operator; a command's offset is
        # released only once its outcome is acknowledged, so a crash before decides it again.
        self._write_outcome = write_outcome
        self._completions: set[asyncio.Future[None]] = set()
        # Unfinished work per building: a manifest's building record waits for what it counted on.
        self._building_work: dict[tuple[str, str], set[asyncio.Future[None]]] = {}
        self._decided_wait: DecidedWait | None = None
        self._manifest_topic = topics[MANIFESTS]
        # The time of the manifest stream: the newest record time read from it (never ahead of
        # the clock). Expiry counts in it while older records are still to be read.
        self._manifest_time: dt.datetime | None = None
        # First publications that send history, waiting for an operator's approval; their
        # offsets stay uncommitted, so a restart reads them again (and holds them again).
        self._awaiting: dict[tuple[str, str], tuple[CompleteManifest, SourceRecord]] = {}
        # What each of them would upload once approved: the planned total counts it from the
        # first manifest on, so the progress's denominator does not grow with the approval.
        self._awaiting_uploads: dict[tuple[str, str], tuple[DocKey, ...]] = {}
        # Whether the manifest partition was read to its end at the last look (housekeeping's):
        # what awaits approval is then known, not half read.
        self.manifests_caught_up = False
        # Events counted per (kind, outcome) while a fetch is handled, added to the counter after
        # it: the hot path counts every record, the counter's lock once per fetch.
        self._uncounted: dict[tuple[str, str], int] = {}
        # Commands refused here: how many, and the newest few (what /status shows).
        self.refused_total = 0
        self.refused: deque[RefusedCommand] = deque(maxlen=REFUSALS_KEPT)

    @property
    def pending_operations(self) -> int:
        """Unfinished operations, not counting a paused agency's: its held work must not stop
        the partition's other agencies (back-pressure), nor hold up a shutdown's drain."""
        return self._executor.pending

    @property
    def pending_by_lane(self) -> tuple[int, int]:
        """Unfinished live and backfill operations (a paused agency's not counted)."""
        return self._executor.pending_in(Lane.LIVE), self._executor.pending_in(Lane.BACKFILL)

    @property
    def pending_inline_bytes(self) -> int:
        """Inline content held by its queued uploads, paused agencies' included."""
        return self._executor.inline_bytes

    @property
    def late_copy_checks_owed(self) -> int:
        """Documents sent again after an in-doubt create that will be looked up again."""
        return self._executor.late_copy_checks_owed

    @property
    def held_operations(self) -> int:
        """Operations of paused agencies, waiting with their offsets uncommitted."""
        return self._executor.held

    @property
    def manifests_topic(self) -> str:
        return self._manifest_topic

    def awaiting_approval(self) -> dict[str, list[str]]:
        """Buildings whose first publication waits for an operator's approval, by agency."""
        found: dict[str, list[str]] = {}
        for agency, building in sorted(self._awaiting):
            found.setdefault(agency, []).append(building)
        return found

    def awaiting_uploads(self) -> dict[str, int]:
        """Per agency, the documents the manifests awaiting approval would upload that are
        neither on the partner nor being sent (those are counted as done or sending already)."""
        found: dict[str, int] = {}
        for (agency, _), keys in self._awaiting_uploads.items():
            for key in keys:
                brief = self.view.brief(key)  # every few seconds, for every document: the cheap one
                if brief is None or (
                    brief.status not in ON_PARTNER and brief.status is not DocStatus.UPLOADING
                ):
                    found[agency] = found.get(agency, 0) + 1
        return found

    def committable(self) -> dict[str, int]:
        """Next offset to commit per topic: the lowest one whose work is not finished."""
        offsets = {}
        for topic, tracker in self._trackers.items():
            offset = tracker.committable()
            if offset is not None:
                offsets[topic] = offset
        return offsets

    async def handle(self, source: SourceRecord) -> None:
        await self.handle_batch((source,))

    async def handle_batch(self, sources: Iterable[SourceRecord]) -> None:
        """Handle the records of one fetch in order. The clock is read once for them all (each
        was published before it) and their outcomes are counted once per kind and outcome."""
        await self._writer.room()  # state records waiting beyond the bound: read no further
        now = self._clock()
        try:
            for source in sources:
                tracker = self._trackers[source.topic]
                tracker.begin(source.offset)
                try:
                    await self._handle(self._kinds[source.topic], tracker, source, now)
                except Exception as error:  # noqa: BLE001 - classify() decides; fatal raised again
                    await self._set_aside(source, error)
                    if tracker.is_open(source.offset):
                        tracker.done(source.offset)
        finally:
            self._flush_counts()

    async def _set_aside(self, source: SourceRecord, error: Exception) -> None:
        """One record's work failed in a way no edge foresaw: dead-letter it and go on.

        Only infrastructure (the dead-letter or state topic unreachable) is raised, to stop the
        relay; a restart reads the record again.
        """
        verdict = classify(error, Scope.RECORD)
        if verdict.disposition is Disposition.FATAL:
            raise error
        if not verdict.expected:
            self._metrics.unexpected_errors.labels("record").inc()
        log.error(
            "input record set aside",
            exc_info=error,
            extra={
                "reason": verdict.reason,
                "topic": source.topic,
                "partition": source.partition,
                "offset": source.offset,
            },
        )
        if source.offset >= 0:  # work the relay started itself has no record to set aside
            detail = f"{type(error).__name__}: {error}"
            await self._dead_letters.send(source, reason=verdict.reason, detail=detail)
            self._metrics.events.labels(
                self._kinds.get(source.topic, "relay"), "dead_lettered"
            ).inc()

    async def _handle(
        self, kind: str, tracker: OffsetTracker, source: SourceRecord, now: dt.datetime
    ) -> None:
        if kind == COMMANDS:
            await self._handle_command(source, now)
            return
        published_at = _record_time(source, now) if kind == MANIFESTS else None
        if published_at is not None:
            self._manifest_time = max(self._manifest_time or published_at, published_at)
        decoded = decode_record(
            topic_kind=kind,
            key=source.key,
            value=source.value,
            headers=source.headers,
            max_value_bytes=self._max_value_bytes,
            not_after=now + self._max_clock_skew,
        )
        if isinstance(decoded, Poison):
            await self._dead_letters.send(
                source, reason=decoded.reason.value, detail=decoded.detail
            )
            self._metrics.events.labels(kind, "dead_lettered").inc()
            if kind == MANIFESTS:
                self._abandon_snapshot(source, published_at or now)
            tracker.done(source.offset)
            return
        if isinstance(decoded, DocumentCreated):
            plan = plan_document(self.view, self._routing, decoded)
            self._count_event(kind, plan.outcome)
            place = (decoded.agency_id, decoded.building_id)
            decided = plan.outcome in DECIDED_BY_MANIFEST and place in self._building_work
            offsets = [(source.topic, source.offset)]
            if not plan.records and not plan.operations:
                if decided:  # released once the manifest that decided it is recorded
                    self._release_after_building(place, offsets)
                else:
                    tracker.done(source.offset)  # nothing to wait for (a filtered document, say)
                return
            self._execute(plan, source, offsets, decided_by=place if decided else None)
            return
        # A record without a timestamp counts from its taken_at, which also survives a restart.
        await self._handle_part(decoded, source, published_at or min(decoded.taken_at, now))

    def _count_event(self, kind: str, outcome: str) -> None:
        key = (kind, outcome)
        self._uncounted[key] = self._uncounted.get(key, 0) + 1

    def _flush_counts(self) -> None:
        for (kind, outcome), count in self._uncounted.items():
            self._metrics.events.labels(kind, outcome).inc(count)
        self._uncounted.clear()

    async def _handle_command(self, source: SourceRecord, now: dt.datetime) -> None:
        if is_outcome(source.headers):
            # An outcome record (a replica's answer, or a forgery of one): never a command.
            self._trackers[source.topic].done(source.offset)
            return
        command = decode_command(source.key, source.value)
        if isinstance(command, Poison):
            await self._dead_letters.send(
                source, reason=command.reason.value, detail=command.detail
            )
            self._metrics.events.labels(COMMANDS, "dead_lettered").inc()
            self._metrics.commands.labels(UNREADABLE, "dead_lettered").inc()
            self._trackers[source.topic].done(source.offset)
            return
        action = command.command
        self._metrics.events.labels(COMMANDS, action.value).inc()
        refused = (
            mac_refusal(self._command_key, source.key, source.value or b"", source.headers)
            or refusal(self._routing, command)
            or approval_refusal(
                self.view,
                self._routing,
                self._guard,
                command,
                partition=self.partition,
                waiting=[m for (a, _), (m, _) in self._awaiting.items() if a == command.agency_id],
            )
        )
        if refused is not None:
            self._refuse(command, refused, source, now)
            return
        self._metrics.commands.labels(action.value, CARRIED_OUT).inc()
        if action is AgencyAction.RETRY:
            self._on_command(action)  # before anything is sent: the API keys are read again
        if self._start_repair(command, source):
            return
        if isinstance(action, HeldAction) and command.building_id is not None:
            agency_id, building_id = command.agency_id, command.building_id
            if action is HeldAction.DISCARD:
                plan = discard_held(self.view, self._routing, agency_id, building_id)
            else:
                plan = release_held(self.view, agency_id, building_id)
            work_source = source
        else:
            # Work the relay starts itself (parked documents sent again) has no input record to
            # dead-letter: a refusal keeps the document parked with the refusal.
            plan = plan_agency_command(self.view, self._routing, command)
            work_source = self._admin_source(action)
        answered: asyncio.Future[None] | None = self._carry_out(command, plan, work_source, source)
        if isinstance(action, AgencyAction) and action in CONTROLS:
            self._on_command(action)
        uploads = sum(isinstance(op, Upload) for op in plan.operations)
        try:
            if action is AgencyAction.APPROVE:
                uploads += await self._apply_approved(command.agency_id)
        finally:  # answered whatever happens, or the command's offset would wait forever
            self._answer(command, plan, source, now, answered, uploads=uploads)

    async def _apply_approved(self, agency_id: str) -> int:
        """Apply the agency's manifests that waited for the approval; the uploads queued."""
        uploads = 0
        for place in [p for p in self._awaiting if p[0] == agency_id]:
            manifest, held_source = self._awaiting.pop(place)
            self._awaiting_uploads.pop(place, None)
            uploads += await self.apply_manifest(manifest, held_source)
        return uploads

    def _answer(
        self,
        command: OperatorCommand,
        plan: Plan,
        source: SourceRecord,
        now: dt.datetime,
        answered: asyncio.Future[None] | None,
        *,
        uploads: int,
    ) -> None:
        """Write the outcome of a command carried out, into ``answered`` (which its offset
        waits for). A retry says how many documents it sends again and what stays parked."""
        if answered is None or self._write_outcome is None:
            return
        still_parked: dict[str, int] = {}
        unmapped: set[str] = set()
        if command.command is AgencyAction.RETRY:
            acted = {op.key for op in plan.operations} | {r.key for r in plan.records}
            for record in self.view.parked():
                key = record.key
                if key.agency_id != command.agency_id or key in acted:
                    continue
                if command.building_id not in (None, key.building_id):
                    continue
                reason = (record.parked_reason or "unknown").split(":", 1)[0]
                still_parked[reason] = still_parked.get(reason, 0) + 1
                if reason == "unmapped_building":
                    unmapped.add(key.building_id)
        outcome = carried_out_outcome(
            command,
            partition=source.partition,
            offset=source.offset,
            at=now,
            documents=len(plan.operations)
            if command.command is AgencyAction.RETRY
            else (len(plan.operations) + len(plan.records)),
            uploads=uploads,
            still_parked=still_parked,
            unmapped=unmapped,
        )
        _chain(self._write_outcome(outcome), answered)

    def _answered(self, source: SourceRecord, written: asyncio.Future[None]) -> None:
        """A refused command's outcome was written: its offset may be committed."""
        if written.cancelled():
            return  # the partition closed: the command is read again, and answered again
        if (error := written.exception()) is not None:
            self._on_failure(error)  # the offset stays open: the restart answers it
            return
        self._trackers[source.topic].done(source.offset)

    def _refuse(
        self, command: OperatorCommand, refused: Refusal, source: SourceRecord, now: dt.datetime
    ) -> None:
        """A command this replica's view does not allow: one log line, a count, its outcome
        record, nothing else (no state record, no metric series of its target). Its offset is
        released once the outcome is acknowledged."""
        log.warning(
            "operator command refused",
            extra={
                "command": command.command.value,
                "reason": refused.value,
                "agency": command.agency_id,
                "building": command.building_id,
                "partition": self.partition,
                "requested_by": command.requested_by,
            },
        )
        self._metrics.commands.labels(command.command.value, refused.value).inc()
        self.refused_total += 1
        self.refused.append(RefusedCommand(now, self.partition, command, refused))
        if self._write_outcome is None:
            self._trackers[source.topic].done(source.offset)
            return
        outcome = refusal_outcome(
            command, refused, partition=source.partition, offset=source.offset, at=now
        )
        answered = self._write_outcome(outcome)
        answered.add_done_callback(functools.partial(self._answered, source))
        self._completions.add(answered)
        answered.add_done_callback(self._completions.discard)

    def _carry_out(
        self, command: OperatorCommand, plan: Plan, work_source: SourceRecord, source: SourceRecord
    ) -> asyncio.Future[None] | None:
        """Start ``plan``; returns the future its outcome's write is to end, which the command's
        offset waits for besides the plan's work (None: no outcome is written)."""
        # An operator's command is the normal course of things: INFO, and no building=None for
        # the agency-wide ones.
        where = {"building": command.building_id} if command.building_id is not None else {}
        log.info(
            "operator command",
            extra={
                "command": command.command.value,
                "agency": command.agency_id,
                **where,
                "partition": self.partition,
                "requested_by": command.requested_by,
                "documents": len(plan.operations) + len(plan.records),
                "uploads": sum(isinstance(op, Upload) for op in plan.operations),
            },
        )
        answered: asyncio.Future[None] | None = None
        if self._write_outcome is not None:
            answered = asyncio.get_running_loop().create_future()
        self._execute(plan, work_source, [(source.topic, source.offset)], also=answered)
        return answered

    def retry_parked(self) -> int:
        """After a restart with fixed configuration: send what was parked and now can go."""
        plan = retry_parked(self.view, self._routing)
        self._execute(plan, self._admin_source("parked"), [])
        return len(plan.operations)

    def _admin_source(self, what: str) -> SourceRecord:
        return SourceRecord(
            topic=f"relay:{what}",
            partition=self.partition,
            offset=-1,
            timestamp_ms=-1,
            key=None,
            value=None,
            headers=(),
        )

    def _execute(
        self,
        plan: Plan,
        source: SourceRecord,
        offsets: Iterable[tuple[str, int]],
        *,
        decided_by: tuple[str, str] | None = None,
        applied: _Applied | None = None,
        also: asyncio.Future[None] | None = None,
    ) -> None:
        """Apply and write the plan's records, submit its operations, and release ``offsets``
        (each opened by ``begin`` when read) once all of that is acknowledged. ``applied``: the
        plan's records applied already, in steps (``_apply_records_in_steps``).

        A plan of operations alone (a document's upload, the common case) waits as its batch's
        future, with no task of its own: held work costs its items, not coroutines.
        ``decided_by``: the building whose manifest decided the plan (a document it supersedes,
        or one that waits for its hold); the offsets wait for that building's work too, so that
        a crash before the manifest is recorded reads the document again with the manifest.
        ``also``: one more write the offsets wait for (a command's outcome record).
        """
        held = list(offsets)
        building_wide = list(self._building_work.get(decided_by, ())) if decided_by else []
        writes, now, deferred = applied or self._apply_records(plan, plan.records, ([], [], []))
        if also is not None:
            writes.append(also)
        if (
            now
            and not (writes or deferred or building_wide or plan.operations or plan.marks)
            and len(now) <= WRITE_CHUNK
        ):
            self._write_alone(now, held, source)
            return
        if now:
            writes.append(_write_all(self._writer, now))
        batch = self._executor.submit(plan.operations, source=source) if plan.operations else None
        if plan.marks:
            self._executor.mark(plan.marks)  # on the uploads queued so far, this plan's included
        completion: asyncio.Future[None]
        places = {(r.agency_id, r.building_id) for r in deferred}
        if writes or deferred or building_wide:
            earlier = [work for place in places for work in self._building_work.get(place, ())]
            earlier += building_wide
            completion = asyncio.create_task(
                self._complete(
                    writes, batch, deferred=deferred, offsets=held, earlier=earlier, source=source
                )
            )
            completion.add_done_callback(self._forget_completion)
        elif batch is not None:
            completion = batch.future
            completion.add_done_callback(functools.partial(self._batch_done, held, source))
        else:
            for topic, offset in held:
                self._trackers[topic].done(offset)
            return
        places |= {(op.key.agency_id, op.key.building_id) for op in plan.operations}
        for place in places:
            self._building_work.setdefault(place, set()).add(completion)
            self._decided_wait = None  # work was added: a later event waits for it too
        self._completions.add(completion)
        completion.add_done_callback(functools.partial(self._forget_work, places))

    def _release_after_building(
        self, place: tuple[str, str], offsets: list[tuple[str, int]]
    ) -> None:
        """Release ``offsets`` (of an event a manifest decided, with nothing to do) once the
        building's work queued now is done. Events read in a row share one wait until more
        work is queued: re-reading a backlog behind a first publication costs no task each."""
        wait = self._decided_wait
        if wait is None or wait[0] != place or wait[2].done():
            gathered = asyncio.gather(*self._building_work[place], return_exceptions=True)
            wait = self._decided_wait = (place, [], gathered)
            waiting = wait[1]

            def release(done: asyncio.Future[list[BaseException | None]]) -> None:
                # Work cancelled: the partition closed, and the events are read again.
                if not done.cancelled() and not any(
                    isinstance(outcome, asyncio.CancelledError) for outcome in done.result()
                ):
                    self._release(waiting)

            gathered.add_done_callback(release)
        wait[1].extend(offsets)

    def _apply_records_in_steps(self, plan: Plan) -> Generator[None, None, _Applied]:
        """``_apply_records`` of a large plan, pausing (``yield``) after every ``APPLY_STEP``
        records; the sorted writes are the return value."""
        applied: _Applied = ([], [], [])
        for start in range(0, len(plan.records), APPLY_STEP):
            if start:
                yield
            self._apply_records(plan, plan.records[start : start + APPLY_STEP], applied)
        return applied

    def _apply_records(
        self, plan: Plan, records: Sequence[StateRecord], applied: _Applied
    ) -> _Applied:
        """Apply ``records`` (of ``plan``) to the view and sort their writes into ``applied``:
        queued behind their document's work, to write at once, or deferred (a building
        record)."""
        writes, now, deferred = applied
        for record in records:
            self.view.apply(record)
            if isinstance(record, BuildingRecord) and (
                plan.operations or self._building_work.get((record.agency_id, record.building_id))
            ):
                # "This manifest is applied" becomes durable only once the operations it counted
                # on are: its own, and those already queued for the building (the view shows them
                # done). A crash before that reads the manifest again instead of judging it
                # stale, and the events behind those operations are not judged decided by it.
                deferred.append(record)
            else:
                # Behind the work already queued on its document, if any: in that order on disk.
                queued = self._executor.queue_after(record)
                if queued is None:
                    now.append(record)
                else:
                    writes.append(queued)
        return applied

    def _write_alone(
        self, records: list[StateRecord], offsets: list[tuple[str, int]], source: SourceRecord
    ) -> None:
        """The common plan of ingest (a document's record, nothing to send or wait for): its
        records' acknowledgements are its completion, with no task of its own."""
        submitted = [self._writer.submit(record) for record in records]
        written = submitted[0] if len(submitted) == 1 else _all_of(submitted)
        self._completions.add(written)
        written.add_done_callback(functools.partial(self._written, offsets, source))

    def _written(
        self, offsets: list[tuple[str, int]], source: SourceRecord, done: asyncio.Future[None]
    ) -> None:
        """``_write_alone``'s records were acknowledged (or failed): one callback for both."""
        self._completions.discard(done)
        self._batch_done(offsets, source, done)

    async def _complete(
        self,
        writes: list[Awaitable[object]],
        batch: Batch | None,
        *,
        deferred: list[BuildingRecord],
        offsets: list[tuple[str, int]],
        earlier: list[asyncio.Future[None]],
        source: SourceRecord,
    ) -> None:
        try:
            await asyncio.gather(*writes, *([batch.future] if batch else []))
        except Exception as error:  # noqa: BLE001 - classify() decides; fatal is raised again
            await self._set_aside(source, error)
        if earlier:
            # Earlier work of the building (a manifest's uploads, a document's) it counted on.
            await asyncio.gather(*earlier, return_exceptions=True)
        for record in deferred:
            await self._writer.write(record)
        self._release(offsets)

    def _batch_done(
        self, offsets: list[tuple[str, int]], source: SourceRecord, done: asyncio.Future[None]
    ) -> None:
        """A plan of operations alone ended: release its offsets, or set its record aside."""
        if done.cancelled():
            return  # the partition closed: its offsets stay open and are read again
        error = done.exception()
        if error is None:
            self._release(offsets)
            return
        aside = asyncio.create_task(self._aside_and_release(source, error, offsets))
        self._completions.add(aside)
        aside.add_done_callback(self._forget_completion)
        aside.add_done_callback(self._completions.discard)

    async def _aside_and_release(
        self, source: SourceRecord, error: BaseException, offsets: list[tuple[str, int]]
    ) -> None:
        if not isinstance(error, Exception):
            raise error
        await self._set_aside(source, error)
        self._release(offsets)

    def _release(self, offsets: list[tuple[str, int]]) -> None:
        for topic, offset in offsets:
            self._trackers[topic].done(offset)

    def _forget_completion(self, task: asyncio.Future[None]) -> None:
        if not task.cancelled() and (error := task.exception()) is not None:
            # Only infrastructure gets here (the changelog unreachable): the work would hold its
            # offsets forever, so stop instead and let the restart redo it from the commit.
            self._on_failure(error)

    def _forget_work(self, places: Iterable[tuple[str, str]], work: asyncio.Future[None]) -> None:
        """``work`` ended: forget it where it was counted (the buildings of ``places``)."""
        self._completions.discard(work)
        for place in places:
            pending = self._building_work.get(place)
            if pending is not None:
                pending.discard(work)
                if not pending:
                    del self._building_work[place]

    def resume(self) -> None:
        """The paused agencies changed: start the work that may run now."""
        self._executor.resume()

    async def close(self) -> None:
        """Stop this partition's work; unfinished offsets stay uncommitted and are read again."""
        await self._executor.cancel_all()
        for task in list(self._completions):
            task.cancel()
        await asyncio.gather(*self._completions, return_exceptions=True)

    async def _handle_part(
        self, part: ManifestSnapshot, source: SourceRecord, published_at: dt.datetime
    ) -> None:
        result = self._assembler.add(part, offset=source.offset, now=published_at)
        self._metrics.manifests.labels(result.outcome).inc()
        refused = _REFUSED_PARTS.get(result.outcome)
        if refused is not None:
            # Input that can never work: kept with its bytes, not only counted.
            reason, detail = refused
            await self._dead_letters.send(
                source,
                reason=reason.value,
                detail=f"snapshot {part.snapshot_id} part {part.part} of {part.parts}: {detail}",
            )
        for dropped in result.dropped:
            self._report_dropped(dropped, counted=dropped.reason is result.outcome)
        for offset in result.released:
            self._trackers[source.topic].done(offset)
        if result.complete is not None:
            await self.apply_manifest(result.complete, source)

    def _abandon_snapshot(self, source: SourceRecord, at: dt.datetime) -> None:
        """A dead-lettered part's snapshot can never complete: let its siblings go now."""
        snapshot = claimed_snapshot(source.key, source.value)
        if snapshot is None:
            return
        result = self._assembler.abandon(snapshot, now=at)
        for dropped in result.dropped:
            self._report_dropped(dropped, counted=False)
        for offset in result.released:
            self._trackers[source.topic].done(offset)

    def _report_dropped(self, dropped: DroppedSnapshot, *, counted: bool) -> None:
        if not counted:
            self._metrics.manifests.labels(dropped.reason).inc()
        log.warning(
            "manifest snapshot dropped without effect",
            extra={
                "reason": dropped.reason.value,
                "agency": dropped.agency_id,
                "building": dropped.building_id,
                "snapshot_id": dropped.snapshot_id,
                "parts_received": dropped.parts_received,
                "parts": dropped.parts,
                "offsets": list(dropped.offsets),
                "partition": self.partition,
            },
        )

    async def apply_manifest(self, manifest: CompleteManifest, source: SourceRecord) -> int:
        """Plan and carry out a complete manifest (or hold it for approval), a step of its
        documents at a time: the event loop (``/livez``, the other partitions) runs between the
        steps of a large one, while this partition's next record waits for it. Returns the
        uploads it queued."""
        plan = await _in_steps(
            plan_manifest_in_steps(self.view, self._routing, manifest, self._guard)
        )
        waiting = unapproved_modules(self.view, self._routing, manifest, plan)
        if waiting:
            sends = tuple(op.key for op in plan.operations if isinstance(op, Upload))
            self._await_approval(manifest, source, waiting, sends)
            return 0
        self._metrics.events.labels(MANIFESTS, plan.outcome).inc()
        agency = manifest.agency_id
        backfill = sum(
            1 for op in plan.operations if isinstance(op, Upload) and op.lane is Lane.BACKFILL
        )
        if backfill:
            self._metrics.first_publication_planned.labels(agency).inc(backfill)
        log.info(
            "manifest applied",
            extra={
                "agency": agency,
                "building": manifest.building_id,
                "snapshot_id": manifest.snapshot_id,
                "outcome": plan.outcome,
                "operations": len(plan.operations),
                "records": len(plan.records),
            },
        )
        applied = await _in_steps(self._apply_records_in_steps(plan))
        offsets = [(self._manifest_topic, o) for o in manifest.offsets]
        self._execute(plan, source, offsets, applied=applied)
        if plan.outcome is Outcome.HELD:
            held = self.view.held(agency, manifest.building_id)
            uploads = sum(record.status is DocStatus.UPLOAD_HELD for record in held)
            log.warning(
                "manifest held: what it would withdraw or keep unpublished waits for an operator",
                extra={
                    "agency": agency,
                    "building": manifest.building_id,
                    "snapshot_id": manifest.snapshot_id,
                    "withdrawals": len(held) - uploads,
                    "uploads": uploads,
                    "hint": f"chouette-relay held, then release or discard {agency} "
                    f"{manifest.building_id}",
                },
            )
        return backfill

    def _await_approval(
        self,
        manifest: CompleteManifest,
        source: SourceRecord,
        modules: set[str],
        uploads: tuple[DocKey, ...],
    ) -> None:
        """Keep the newest such manifest of the building; a superseded one is done."""
        place = (manifest.agency_id, manifest.building_id)
        kept = self._awaiting.get(place)
        if kept is not None and kept[0].taken_at > manifest.taken_at:
            manifest, source, kept = kept[0], kept[1], (manifest, source)
        else:
            self._awaiting_uploads[place] = uploads
        if kept is not None:
            for offset in kept[0].offsets:
                self._trackers[self._manifest_topic].done(offset)
        self._awaiting[place] = (manifest, source)
        self._metrics.events.labels(MANIFESTS, "awaiting_approval").inc()
        # Waiting is what the routing asked for, not a fault: the replica says it once per
        # agency at INFO when what awaits is known (the relay's summary), each building at DEBUG.
        log.debug(
            "building's first publication awaits an operator's approval",
            extra={
                "agency": manifest.agency_id,
                "building": manifest.building_id,
                "modules": sorted(modules),
                "uploads": len(uploads),
            },
        )

    def expire(self, *, caught_up: bool) -> None:
        """Drop incomplete snapshots past their deadline; they never delete anything.

        Expiry counts from the time their first part was published, so a restart does not reset
        it. Once the manifest partition is read to its end (``caught_up``), time is the clock:
        an orphan part expires though no record follows it. Before that it is the newest record
        time read, so that a backlog older than the expiry does not expire snapshots whose last
        parts are only a few records further.
        """
        self.manifests_caught_up = caught_up
        now = self._clock() if caught_up else self._manifest_time
        if now is None:
            return
        for expired in self._assembler.expire(now):
            self._metrics.manifests.labels("expired").inc()
            log.warning(
                "incomplete manifest expired",
                extra={
                    "agency": expired.agency_id,
                    "building": expired.building_id,
                    "snapshot_id": expired.snapshot_id,
                    "parts_received": expired.parts_received,
                    "parts": expired.parts,
                    "offsets": list(expired.offsets),
                    "partition": self.partition,
                },
            )
            for offset in expired.offsets:
                self._trackers[self._manifest_topic].done(offset)

    def _start_repair(self, command: OperatorCommand, source: SourceRecord) -> bool:
        """Start a repair in a task; False if ``command`` is not one."""
        if command.command is not AgencyAction.REPAIR or command.building_id is None:
            return False
        # Asking the partner and reading the partition again take a while: the other records
        # and partitions go on meanwhile, the command's offset stays open until its work is done.
        task = asyncio.create_task(self._repair(command, source))
        self._completions.add(task)
        task.add_done_callback(self._completions.discard)
        return True

    async def _repair(self, command: OperatorCommand, source: SourceRecord) -> None:
        try:
            copies = await self._copies_for(command)
            resend = await self._resend_for(command, copies)
        except Exception as error:  # noqa: BLE001 - the relay stops; its restart repairs again
            self._on_failure(error)  # the command's offset stays uncommitted
            return
        plan = plan_agency_command(self.view, self._routing, command, resend, copies)
        answered = self._carry_out(command, plan, self._admin_source(command.command), source)
        uploads = sum(isinstance(op, Upload) for op in plan.operations)
        self._answer(command, plan, source, self._clock(), answered, uploads=uploads)

    async def _copies_for(self, command: OperatorCommand) -> Copies:
        """The partner's copies of each reference the findings name, in the building's
        condominium; without a way to ask (or a condominium) nothing is confirmed."""
        config = self._routing.agency(command.agency_id)
        building = command.building_id
        condominium = config.condominia.get(building) if config and building else None
        if self._find_copies is None or condominium is None:
            return {}
        references = frozenset(f.document_id for f in command.findings)
        return await self._find_copies(command.agency_id, condominium, references)

    async def _resend_for(self, command: OperatorCommand, copies: Copies) -> Mapping[str, Resend]:
        """A repair's missing and changed documents, as the input still describes them."""
        wanted = to_resend(command.findings, copies)
        if self._find_resend is None or command.building_id is None or not wanted:
            return {}
        until = {
            topic: (kind, self._trackers[topic].next_to_read)
            for topic, kind in self._kinds.items()
            if kind in _INPUT_KINDS
        }
        found = await self._find_resend(until, (command.agency_id, command.building_id), wanted)
        if len(found) < len(wanted):
            log.warning(
                "repair: documents no longer in the input are forgotten until LSC sends them again",
                extra={
                    "agency": command.agency_id,
                    "building": command.building_id,
                    "forgotten": sorted(wanted - found.keys()),
                },
            )
        return found


def _chain(written: asyncio.Future[Any], into: asyncio.Future[None]) -> None:
    """End ``into`` as ``written`` ends (its result dropped)."""

    def copy(done: asyncio.Future[Any]) -> None:
        if into.done():
            return
        if done.cancelled():
            into.cancel()
        elif (error := done.exception()) is not None:
            into.set_exception(error)
        else:
            into.set_result(None)

    written.add_done_callback(copy)


def _record_time(source: SourceRecord, now: dt.datetime) -> dt.datetime | None:
    """When the record was published (its Kafka timestamp), never later than ``now``."""
    if source.timestamp_ms < 0:
        return None
    if source.timestamp_ms >= now.timestamp() * 1000:
        return now  # also keeps a wild timestamp from overflowing the conversion
    return dt.datetime.fromtimestamp(source.timestamp_ms / 1000, dt.UTC)
