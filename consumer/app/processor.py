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
import logging
from collections.abc import Awaitable, Callable, Iterable

from consumer.core.commands import HeldAction, decode_command
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
)
from consumer.core.records import SourceRecord
from consumer.core.routing import RoutingTable
from consumer.core.state import BuildingRecord
from consumer.core.view import PublishedView
from consumer.kafka.deadletters import DeadLetterSink
from consumer.metrics import RelayMetrics
from consumer.partner.executor import OperationExecutor, RecordWriter

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
        self._completions: set[asyncio.Task[None]] = set()
        # Unfinished work per building: a manifest's building record waits for what it counted on.
        self._building_work: dict[tuple[str, str], set[asyncio.Task[None]]] = {}
        self._manifest_topic = topics[MANIFESTS]
        # The time of the manifest stream: the newest record time read from it (never ahead of
        # the clock). Expiry counts in it while older records are still to be read.
        self._manifest_time: dt.datetime | None = None

    @property
    def pending_operations(self) -> int:
        return self._executor.in_flight

    @property
    def manifests_topic(self) -> str:
        return self._manifest_topic

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
            self._metrics.events.labels(kind, plan.outcome).inc()
            self._execute(plan, source, [(source.topic, source.offset)])
            return
        # A record without a timestamp counts from its taken_at, which also survives a restart.
        await self._handle_part(decoded, source, published_at or min(decoded.taken_at, now))

    async def _handle_command(self, source: SourceRecord) -> None:
        command = decode_command(source.key, source.value)
        if isinstance(command, Poison):
            await self._dead_letters.send(
                source, reason=command.reason.value, detail=command.detail
            )
            self._metrics.events.labels(COMMANDS, "dead_lettered").inc()
            self._trackers[source.topic].done(source.offset)
            return
        settle = discard_held if command.command is HeldAction.DISCARD else release_held
        plan = settle(self.view, command.agency_id, command.building_id)
        self._metrics.events.labels(COMMANDS, command.command.value).inc()
        log.warning(
            "operator command on held deletions",
            extra={
                "command": command.command.value,
                "agency": command.agency_id,
                "building": command.building_id,
                "requested_by": command.requested_by,
                "documents": len(plan.operations) + len(plan.records),
            },
        )
        self._execute(plan, source, [(source.topic, source.offset)])

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
        (each opened by ``begin`` when read) once all of that is acknowledged."""
        held = list(offsets)
        work: list[Awaitable[object]] = []
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
                work.append(self._writer.write(record))
        for operation in plan.operations:
            work.append(self._executor.submit(operation, source=source))
        if not work and not deferred:
            for topic, offset in held:
                self._trackers[topic].done(offset)
            return
        places = {(r.agency_id, r.building_id) for r in deferred}
        earlier = [task for place in places for task in self._building_work.get(place, ())]
        task = asyncio.create_task(self._complete(work, deferred, held, earlier))
        places |= {(op.key.agency_id, op.key.building_id) for op in plan.operations}
        for place in places:
            self._building_work.setdefault(place, set()).add(task)
        self._completions.add(task)
        task.add_done_callback(self._forget_completion)

    async def _complete(
        self,
        work: list[Awaitable[object]],
        deferred: list[BuildingRecord],
        offsets: list[tuple[str, int]],
        earlier: list[asyncio.Task[None]],
    ) -> None:
        await asyncio.gather(*work)
        if deferred and earlier:
            # Earlier work of the building (a manifest's uploads, a document's) it counted on.
            await asyncio.gather(*earlier, return_exceptions=True)
        for record in deferred:
            await self._writer.write(record)
        for topic, offset in offsets:
            self._trackers[topic].done(offset)

    def _forget_completion(self, task: asyncio.Task[None]) -> None:
        self._completions.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            # Work that failed in an unexpected way (the changelog unreachable, a bug) would hold
            # its offsets forever: stop instead, and let the restart redo it from the commit.
            self._on_failure(error)
        for place, pending in list(self._building_work.items()):
            pending.discard(task)
            if not pending:
                del self._building_work[place]

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
