"""A partition's manifests: parts assembled, complete snapshots applied or held for approval,
incomplete ones dropped or expired.

``ManifestWork`` is the half of ``PartitionProcessor`` (which inherits it) that handles the
manifest-snapshot topic; the processor owns the state it reads.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable

from consumer.core.deadletter import ProcessingReason
from consumer.core.decoding import claimed_snapshot
from consumer.core.events import ManifestSnapshot
from consumer.core.guard import DeletionGuard
from consumer.core.manifest import (
    AssemblyOutcome,
    CompleteManifest,
    DroppedSnapshot,
    ManifestAssembler,
)
from consumer.core.offsets import OffsetTracker
from consumer.core.planning.first_publication import unapproved_modules
from consumer.core.planning.manifests import plan_manifest
from consumer.core.planning.plan import Lane, Outcome, Plan, Upload
from consumer.core.records import SourceRecord
from consumer.core.routing import RoutingTable
from consumer.core.state import DocStatus
from consumer.core.view import PublishedView
from consumer.kafka.deadletters import DeadLetterSink
from consumer.metrics import RelayMetrics

log = logging.getLogger("consumer.app.processor")  # the processor's log, as before the split

MANIFESTS = "manifest-snapshot"


class ManifestWork:
    """The manifest half of ``PartitionProcessor``."""

    partition: int
    view: PublishedView
    _assembler: ManifestAssembler
    _routing: RoutingTable
    _guard: DeletionGuard
    _dead_letters: DeadLetterSink
    _metrics: RelayMetrics
    _trackers: dict[str, OffsetTracker]
    _manifest_topic: str
    _manifest_time: dt.datetime | None
    _clock: Callable[[], dt.datetime]
    _awaiting: dict[tuple[str, str], tuple[CompleteManifest, SourceRecord]]

    def _execute(
        self, plan: Plan, source: SourceRecord, offsets: Iterable[tuple[str, int]]
    ) -> None:
        raise NotImplementedError

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
        # Waiting is what the routing asked for, not a fault: one INFO line when the agency's
        # first building of this partition starts waiting, its other buildings at DEBUG.
        first = not any(agency == manifest.agency_id for agency, _ in self._awaiting)
        self._awaiting[place] = (manifest, source)
        self._metrics.events.labels(MANIFESTS, "awaiting_approval").inc()
        log.log(
            logging.INFO if first else logging.DEBUG,
            "first publication awaits an operator's approval",
            extra={
                "agency": manifest.agency_id,
                **({} if first else {"building": manifest.building_id}),
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
