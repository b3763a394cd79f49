"""Processing of one input partition number: decode, plan, record, execute, mark offsets done.

A ``PartitionProcessor`` owns the published view of its partition, the manifest assembler, the
offset trackers of both input topics and the executor. ``handle`` only plans and enqueues; the
offset of a record becomes committable when every state record and partner operation it caused
is acknowledged. It is also where the clock meets the pure core: events dated beyond the clock
plus the allowed skew are dead-lettered, and incomplete snapshots expire by their records' time.
Its manifest half is in ``manifests.py``, the completion of a plan's work in ``completion.py``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import NamedTuple

from consumer.app.completion import DecidedWait, PlanCompletion
from consumer.app.manifests import MANIFESTS, ManifestWork
from consumer.app.repairs import FindCopies, FindResend, RepairWork
from consumer.core.commands import (
    AgencyAction,
    HeldAction,
    OperatorCommand,
    Refusal,
    decode_command,
    mac_refusal,
)
from consumer.core.controls import CONTROLS, approval_refusal, plan_agency_command, refusal
from consumer.core.decoding import Poison, decode_record
from consumer.core.events import DocumentCreated
from consumer.core.guard import DeletionGuard
from consumer.core.manifest import (
    CompleteManifest,
    ManifestAssembler,
)
from consumer.core.offsets import OffsetTracker
from consumer.core.planning.actions import discard_held, release_held, retry_parked
from consumer.core.planning.documents import plan_document
from consumer.core.planning.plan import Lane, Outcome, Plan, Upload
from consumer.core.records import SourceRecord
from consumer.core.routing import RoutingTable
from consumer.core.view import PublishedView
from consumer.failures import Disposition, Scope, classify
from consumer.kafka.deadletters import DeadLetterSink
from consumer.metrics import RelayMetrics
from consumer.partner.executor import OperationExecutor, RecordWriter

__all__ = [
    "COMMANDS",
    "DOCUMENTS",
    "MANIFESTS",
    "FindCopies",
    "FindResend",
    "PartitionProcessor",
    "RefusedCommand",
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


class PartitionProcessor(PlanCompletion, ManifestWork, RepairWork):
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
            self._refuse(command, refused, now)
            self._trackers[source.topic].done(source.offset)
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
        self._carry_out(command, plan, work_source, source)
        if isinstance(action, AgencyAction) and action in CONTROLS:
            self._on_command(action)
        if action is AgencyAction.APPROVE:
            for place in [p for p in self._awaiting if p[0] == command.agency_id]:
                manifest, held_source = self._awaiting.pop(place)
                self.apply_manifest(manifest, held_source)

    def _refuse(self, command: OperatorCommand, refused: Refusal, now: dt.datetime) -> None:
        """A command this replica's view does not allow: one log line, a count, nothing else
        (no state record, no metric series of its target)."""
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

    def _carry_out(
        self, command: OperatorCommand, plan: Plan, work_source: SourceRecord, source: SourceRecord
    ) -> None:
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
        self._execute(plan, work_source, [(source.topic, source.offset)])

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


def _record_time(source: SourceRecord, now: dt.datetime) -> dt.datetime | None:
    """When the record was published (its Kafka timestamp), never later than ``now``."""
    if source.timestamp_ms < 0:
        return None
    if source.timestamp_ms >= now.timestamp() * 1000:
        return now  # also keeps a wild timestamp from overflowing the conversion
    return dt.datetime.fromtimestamp(source.timestamp_ms / 1000, dt.UTC)
