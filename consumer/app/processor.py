"""Processing of one input partition number: decode, plan, record, execute, mark offsets done.

A ``PartitionProcessor`` owns the published view of its partition, the manifest assembler, the
offset trackers of both input topics and the executor. ``handle`` only plans and enqueues; the
offset of a record becomes committable when every state record and partner operation it caused
is acknowledged. It is also where the clock meets the pure core: events dated beyond the clock
plus the allowed skew are dead-lettered, and incomplete snapshots expire by their records' time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable

from consumer.core.commands import AgencyAction, HeldAction, decode_command
from consumer.core.controls import CONTROLS, plan_agency_command
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
from consumer.core.planner import (
    Lane,
    Plan,
    Upload,
    discard_held,
    plan_document,
    plan_manifest,
    release_held,
    retry_parked,
    unapproved_modules,
)
from consumer.core.records import SourceRecord
from consumer.core.routing import RoutingTable
from consumer.core.state import BuildingRecord
from consumer.core.view import PublishedView
from consumer.failures import Disposition, Scope, classify
from consumer.kafka.deadletters import DeadLetterSink
from consumer.metrics import RelayMetrics
from consumer.partner.executor import OperationExecutor
from consumer.partner.setbacks import RecordWriter
from consumer.partner.window import Batch

log = logging.getLogger(__name__)

DOCUMENTS = "document-created"
MANIFESTS = "manifest-snapshot"
COMMANDS = "operator-command"


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
        self._completions: set[asyncio.Future[None]] = set()
        # Unfinished work per building: a manifest's building record waits for what it counted on.
        self._building_work: dict[tuple[str, str], set[asyncio.Future[None]]] = {}
        self._manifest_topic = topics[MANIFESTS]
        # The time of the manifest stream: the newest record time read from it (never ahead of
        # the clock). Expiry counts in it while older records are still to be read.
        self._manifest_time: dt.datetime | None = None
        # First publications that send history, waiting for an operator's approval; their
        # offsets stay uncommitted, so a restart reads them again (and holds them again).
        self._awaiting: dict[tuple[str, str], tuple[CompleteManifest, SourceRecord]] = {}
        # The event counter's child per (kind, outcome): looking a child up by its label values
        # costs more than counting, and the hot path counts every record.
        self._event_counts: dict[tuple[str, str], Callable[[], None]] = {}

    @property
    def pending_operations(self) -> int:
        """Unfinished operations, not counting a paused agency's: its held work must not stop
        the partition's other agencies (back-pressure), nor hold up a shutdown's drain."""
        return self._executor.pending

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

    def committable(self) -> dict[str, int]:
        """Next offset to commit per topic: the lowest one whose work is not finished."""
        offsets = {}
        for topic, tracker in self._trackers.items():
            offset = tracker.committable()
            if offset is not None:
                offsets[topic] = offset
        return offsets

    async def handle(self, source: SourceRecord) -> None:
        kind = self._kinds[source.topic]
        tracker = self._trackers[source.topic]
        tracker.begin(source.offset)
        try:
            await self._handle(kind, tracker, source)
        except Exception as error:  # noqa: BLE001 - classify() decides; fatal is raised again
            await self._set_aside(source, error)
            if tracker.is_open(source.offset):
                tracker.done(source.offset)

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

    async def _handle(self, kind: str, tracker: OffsetTracker, source: SourceRecord) -> None:
        if kind == COMMANDS:
            await self._handle_command(source)
            return
        now = self._clock()
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
            if not plan.records and not plan.operations:
                tracker.done(source.offset)  # nothing to wait for (a filtered document, say)
                return
            self._execute(plan, source, [(source.topic, source.offset)])
            return
        # A record without a timestamp counts from its taken_at, which also survives a restart.
        await self._handle_part(decoded, source, published_at or min(decoded.taken_at, now))

    def _count_event(self, kind: str, outcome: str) -> None:
        count = self._event_counts.get((kind, outcome))
        if count is None:
            count = self._event_counts[kind, outcome] = self._metrics.events.labels(
                kind, outcome
            ).inc
        count()

    async def _handle_command(self, source: SourceRecord) -> None:
        command = decode_command(source.key, source.value)
        if isinstance(command, Poison):
            await self._dead_letters.send(
                source, reason=command.reason.value, detail=command.detail
            )
            self._metrics.events.labels(COMMANDS, "dead_lettered").inc()
            self._trackers[source.topic].done(source.offset)
            return
        action = command.command
        self._metrics.events.labels(COMMANDS, action.value).inc()
        if action is AgencyAction.RETRY:
            self._on_command(action)  # before anything is sent: the API keys are read again
        if isinstance(action, HeldAction) and command.building_id is not None:
            settle = discard_held if action is HeldAction.DISCARD else release_held
            plan, work_source = settle(self.view, command.agency_id, command.building_id), source
        else:
            # Work the relay starts itself (parked documents sent again) has no input record to
            # dead-letter: a refusal keeps the document parked with the refusal.
            plan = plan_agency_command(self.view, self._routing, command)
            work_source = self._admin_source(action)
        log.warning(
            "operator command",
            extra={
                "command": action.value,
                "agency": command.agency_id,
                "building": command.building_id,
                "partition": self.partition,
                "requested_by": command.requested_by,
                "documents": len(plan.operations) + len(plan.records),
            },
        )
        self._execute(plan, work_source, [(source.topic, source.offset)])
        if isinstance(action, AgencyAction) and action in CONTROLS:
            self._on_command(action)
        if action is AgencyAction.APPROVE:
            for place in [p for p in self._awaiting if p[0] == command.agency_id]:
                manifest, held_source = self._awaiting.pop(place)
                self.apply_manifest(manifest, held_source)

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
            self.apply_manifest(result.complete, source)

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

    def apply_manifest(self, manifest: CompleteManifest, source: SourceRecord) -> None:
        plan = plan_manifest(self.view, self._routing, manifest, self._guard)
        waiting = unapproved_modules(self.view, self._routing, manifest, plan)
        if waiting:
            self._await_approval(manifest, source, waiting)
            return
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
        self._execute(plan, source, [(self._manifest_topic, o) for o in manifest.offsets])

    def _await_approval(
        self, manifest: CompleteManifest, source: SourceRecord, modules: set[str]
    ) -> None:
        """Keep the newest such manifest of the building; a superseded one is done."""
        place = (manifest.agency_id, manifest.building_id)
        kept = self._awaiting.get(place)
        if kept is not None and kept[0].taken_at > manifest.taken_at:
            manifest, source, kept = kept[0], kept[1], (manifest, source)
        if kept is not None:
            for offset in kept[0].offsets:
                self._trackers[self._manifest_topic].done(offset)
        self._awaiting[place] = (manifest, source)
        self._metrics.events.labels(MANIFESTS, "awaiting_approval").inc()
        log.warning(
            "first publication awaits an operator's approval",
            extra={
                "agency": manifest.agency_id,
                "building": manifest.building_id,
                "modules": sorted(modules),
                "hint": f"chouette-relay plan --agency {manifest.agency_id}, then approve",
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
        self, plan: Plan, source: SourceRecord, offsets: Iterable[tuple[str, int]]
    ) -> None:
        """Apply and write the plan's records, submit its operations, and release ``offsets``
        (each opened by ``begin`` when read) once all of that is acknowledged.

        A plan of operations alone (a document's upload, the common case) waits as its batch's
        future, with no task of its own: held work costs its items, not coroutines.
        """
        held = list(offsets)
        writes: list[Awaitable[object]] = []
        deferred: list[BuildingRecord] = []
        for record in plan.records:
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
                writes.append(self._writer.write(record))
        batch = self._executor.submit(plan.operations, source=source) if plan.operations else None
        completion: asyncio.Future[None]
        places = {(r.agency_id, r.building_id) for r in deferred}
        if writes or deferred:
            earlier = [work for place in places for work in self._building_work.get(place, ())]
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
        self._completions.add(completion)
        completion.add_done_callback(self._forget_work)

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
        if deferred and earlier:
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
        aside.add_done_callback(self._forget_work)

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

    def _forget_work(self, work: asyncio.Future[None]) -> None:
        self._completions.discard(work)
        for place, pending in list(self._building_work.items()):
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


def _record_time(source: SourceRecord, now: dt.datetime) -> dt.datetime | None:
    """When the record was published (its Kafka timestamp), never later than ``now``."""
    if source.timestamp_ms < 0:
        return None
    if source.timestamp_ms >= now.timestamp() * 1000:
        return now  # also keeps a wild timestamp from overflowing the conversion
    return dt.datetime.fromtimestamp(source.timestamp_ms / 1000, dt.UTC)
