"""Processing of one input partition number: decode, plan, record, execute, mark offsets done.

A ``PartitionProcessor`` owns the published view of its partition, the manifest assembler, the
offset trackers of both input topics and the executor. ``handle`` only plans and enqueues; the
offset of a record becomes committable when every state record and partner operation it caused
is acknowledged.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Iterable

from consumer.commands import HeldAction, decode_command
from consumer.decoding import Poison, decode_record
from consumer.events import DocumentCreated, ManifestSnapshot
from consumer.executor import OperationExecutor, RecordWriter
from consumer.failures import Disposition, Scope, classify
from consumer.guard import DeletionGuard
from consumer.manifest import CompleteManifest, ManifestAssembler
from consumer.metrics import RelayMetrics
from consumer.offsets import OffsetTracker
from consumer.planner import (
    Lane,
    Plan,
    Upload,
    discard_held,
    plan_document,
    plan_manifest,
    release_held,
    retry_parked,
)
from consumer.routing import RoutingTable
from consumer.sinks import DeadLetterSink, SourceRecord
from consumer.state import BuildingRecord
from consumer.view import PublishedView

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
        self._on_failure = on_failure
        self._completions: set[asyncio.Task[None]] = set()
        self._building_tails: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._manifest_topic = topics[MANIFESTS]

    @property
    def pending_operations(self) -> int:
        return self._executor.in_flight

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
        decoded = decode_record(
            topic_kind=kind,
            key=source.key,
            value=source.value,
            headers=source.headers,
            max_value_bytes=self._max_value_bytes,
        )
        if isinstance(decoded, Poison):
            await self._dead_letters.send(
                source, reason=decoded.reason.value, detail=decoded.detail
            )
            self._metrics.events.labels(kind, "dead_lettered").inc()
            tracker.done(source.offset)
            return
        if isinstance(decoded, DocumentCreated):
            plan = plan_document(self.view, self._routing, decoded)
            self._metrics.events.labels(kind, plan.outcome).inc()
            self._execute(plan, source, [(source.topic, source.offset)])
            return
        self._handle_part(decoded, source)

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

    def _handle_part(self, part: ManifestSnapshot, source: SourceRecord) -> None:
        result = self._assembler.add(part, offset=source.offset, now=self._clock())
        self._metrics.manifests.labels(result.outcome).inc()
        for offset in result.released:
            self._trackers[source.topic].done(offset)
        if result.complete is not None:
            self.apply_manifest(result.complete, source)

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

    def expire(self) -> None:
        """Drop incomplete snapshots past their deadline; they never delete anything."""
        for expired in self._assembler.expire(self._clock()):
            self._metrics.manifests.labels("expired").inc()
            log.warning(
                "incomplete manifest expired",
                extra={"snapshot_id": expired.snapshot_id, "partition": self.partition},
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
                plan.operations or (record.agency_id, record.building_id) in self._building_tails
            ):
                # "This manifest is applied" becomes durable only once its operations are: a
                # crash before that reads the manifest again instead of judging it stale.
                deferred.append(record)
            else:
                work.append(self._writer.write(record))
        for operation in plan.operations:
            work.append(self._executor.submit(operation, source=source))
        if not work:
            for topic, offset in held:
                self._trackers[topic].done(offset)
            return
        earlier: asyncio.Task[None] | None = None
        places = {(r.agency_id, r.building_id) for r in deferred}
        for place in places:
            earlier = self._building_tails.get(place)
        task = asyncio.create_task(self._complete(work, deferred, held, earlier, source))
        for place in places:
            self._building_tails[place] = task
        self._completions.add(task)
        task.add_done_callback(self._forget_completion)

    async def _complete(
        self,
        work: list[Awaitable[object]],
        deferred: list[BuildingRecord],
        offsets: list[tuple[str, int]],
        earlier: asyncio.Task[None] | None,
        source: SourceRecord,
    ) -> None:
        try:
            await asyncio.gather(*work)
        except Exception as error:  # noqa: BLE001 - classify() decides; fatal is raised again
            await self._set_aside(source, error)
        if deferred and earlier is not None:
            # An earlier manifest of the building may still have uploads this one counted on.
            await asyncio.gather(earlier, return_exceptions=True)
        for record in deferred:
            await self._writer.write(record)
        for topic, offset in offsets:
            self._trackers[topic].done(offset)

    def _forget_completion(self, task: asyncio.Task[None]) -> None:
        self._completions.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            # Only infrastructure gets here (the changelog unreachable): the work would hold its
            # offsets forever, so stop instead and let the restart redo it from the commit.
            self._on_failure(error)
        for place, tail in list(self._building_tails.items()):
            if tail is task:
                del self._building_tails[place]

    async def close(self) -> None:
        """Stop this partition's work; unfinished offsets stay uncommitted and are read again."""
        await self._executor.cancel_all()
        for task in list(self._completions):
            task.cancel()
        await asyncio.gather(*self._completions, return_exceptions=True)
