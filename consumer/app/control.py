"""What an operator and the ops server see of a running relay: status, paused agencies, held
and parked documents, the audit, and the gauges derived from the views.

``RelayControl`` is the control surface of ``Relay`` (which inherits it and builds what it reads).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from importlib.metadata import version
from typing import Any

from consumer.app.processor import PartitionProcessor
from consumer.core.commands import AgencyAction, HeldAction
from consumer.core.routing import RoutingTable
from consumer.core.state import DocStatus
from consumer.core.view import PublishedView
from consumer.errors import ConfigError
from consumer.kafka.changelog import UnreadableRecord
from consumer.kafka.ingest import Ingest
from consumer.metrics import RelayMetrics
from consumer.ops.admin import Operator, held_entries, parked_entry
from consumer.ops.audit import run_audit
from consumer.partner.keys import ApiKeyStore
from consumer.partner.scheduler import Scheduler

log = logging.getLogger("consumer.app.relay")  # the relay's log, as before the split

RELAY_VERSION = version("chouette-relay")


class RelayControl:
    """The control surface of ``Relay``."""

    routing: RoutingTable
    api_keys: ApiKeyStore
    metrics: RelayMetrics
    _ingest: Ingest[PartitionProcessor] | None
    _scheduler: Scheduler | None
    _operator: Operator | None
    _restoring: dict[int, float]
    _unreadable: Mapping[int, Iterable[UnreadableRecord]]

    # -- control surface -----------------------------------------------------------------------
    def is_ready(self) -> bool:
        return self._ingest is not None and self._ingest.ready

    def status(self) -> dict[str, Any]:
        ingest = self._ingest
        processors = ingest.processors if ingest else {}
        partitions = {
            str(p): {
                "documents": proc.view.size,
                "by_status": {s.value: n for s, n in proc.view.counts().items()},
                "pending_operations": proc.pending_operations,
                "pending_by_lane": dict(
                    zip(("live", "backfill"), proc.pending_by_lane, strict=True)
                ),
                "held_operations": proc.held_operations,
                "reading_paused": ingest is not None and ingest.reading_paused(p),
                "committable": proc.committable(),
                "paused": sorted(proc.view.paused_agencies()),
            }
            for p, proc in sorted(processors.items())
        }
        snapshot = self._scheduler.snapshot() if self._scheduler else None
        return {
            "version": RELAY_VERSION,
            "ready": self.is_ready(),
            "restoring": {str(p): r for p, r in self._restoring.items()},
            # State records restore skipped (the newest of each partition's; all are logged).
            "unreadable_state_records": [
                dataclasses.asdict(record)
                for p in sorted(self._unreadable)
                if p in processors
                for record in self._unreadable[p]
            ],
            "partitions": partitions,
            "scheduler": _plain(snapshot),
            "agencies": sorted(self.routing.agencies),
            "paused": sorted(self.paused_agencies()),
            "awaiting_approval": self.awaiting_approval(),
            "held": self.held(),
            "parked": self.parked(),
        }

    def parked(self, limit: int = 100) -> list[dict[str, Any]]:
        """Documents parked until an operator fixes something, with why (at most ``limit``)."""
        found: list[dict[str, Any]] = []
        for processor in self._ingest.processors.values() if self._ingest else ():
            for record in processor.view.parked():
                if len(found) >= limit:
                    return found
                found.append(parked_entry(record))
        return found

    def awaiting_approval(self) -> dict[str, list[str]]:
        """Buildings whose first publication waits for an operator's approval, by agency."""
        found: dict[str, list[str]] = {}
        for processor in self._ingest.processors.values() if self._ingest else ():
            for agency, buildings in processor.awaiting_approval().items():
                found.setdefault(agency, []).extend(buildings)
        return {agency: sorted(buildings) for agency, buildings in sorted(found.items())}

    def paused_agencies(self, *extra: PublishedView) -> set[str]:
        """Agencies paused in the view of any partition this replica owns."""
        views = [p.view for p in self._ingest.processors.values()] if self._ingest else []
        return set().union(*(view.paused_agencies() for view in [*views, *extra]))

    def sync_controls(self, *extra: PublishedView) -> None:
        """Hand the agencies paused in the owned views to the scheduler and the gauge."""
        paused = self.paused_agencies(*extra)
        if self._scheduler is not None and self._scheduler.paused != paused:
            self._scheduler.set_paused(frozenset(paused))
            log.warning("paused agencies", extra={"agencies": sorted(paused)})
            for processor in self._ingest.processors.values() if self._ingest else ():
                processor.resume()  # a resumed agency's queued work starts
        awaiting = self.awaiting_approval()
        for agency_id in set(self.routing.agencies) | paused:
            self.metrics.agency_paused.labels(agency_id).set(1 if agency_id in paused else 0)
            waiting = len(awaiting.get(agency_id, ()))
            self.metrics.awaiting_approval.labels(agency_id).set(waiting)

    def _on_command(self, action: AgencyAction) -> None:
        if action is not AgencyAction.RETRY:
            self.sync_controls()
            return
        # Parked for credentials: the fix may be a rotated key in the mounted Secret's files.
        try:
            self.api_keys.reload()
        except ConfigError as exc:
            log.error("API keys not reloaded", extra={"error": str(exc)})  # noqa: TRY400 - no traceback needed

    async def audit(
        self, agency_id: str, *, building_id: str | None, repair: bool, requested_by: str
    ) -> dict[str, Any]:
        """The audit (the CLI's implementation), its findings kept in a gauge."""
        report = await run_audit(
            self.operator(),
            agency_id,
            building_id=building_id,
            repair=repair,
            requested_by=requested_by,
            scheduler=self._scheduler,  # the audit's requests count against the agency's rate
        )
        for kind, count in report["findings"].items():
            self.metrics.audit_findings.labels(agency_id, kind).set(count)
        return report

    def operator(self) -> Operator:
        """The operator's actions, on this relay's producer (the same ones the CLI runs)."""
        if self._operator is None:
            raise RuntimeError("the relay is not running")
        return self._operator

    def held(self) -> list[dict[str, Any]]:
        """Per building, what waits for the decision on its held manifest: withdrawals and
        uploads (``documents`` counts both)."""
        views = [p.view for p in self._ingest.processors.values()] if self._ingest else []
        return held_entries(record for view in views for record in view.waiting())

    async def settle_held(
        self, agency_id: str, building_id: str, *, discard: bool, requested_by: str
    ) -> dict[str, Any]:
        """Queue an operator command; the replica owning the building carries it out."""
        action = HeldAction.DISCARD if discard else HeldAction.RELEASE
        queued = await self.operator().queue(
            action, agency_id, building_id, requested_by=requested_by
        )
        [written] = queued["partitions"]
        return {"partition": written["partition"], "offset": written["offset"]}

    def refresh_gauges(self) -> None:
        self.sync_controls()  # also forgets the pauses of partitions this replica gave up
        m = self.metrics
        processors = list(self._ingest.processors.values()) if self._ingest else []
        by_status: dict[str, int] = dict.fromkeys((s.value for s in DocStatus), 0)
        held: dict[str, int] = dict.fromkeys(self.routing.agencies, 0)
        parked: dict[str, int] = {}
        for processor in processors:
            for status, count in processor.view.counts().items():
                by_status[status.value] = by_status.get(status.value, 0) + count
            for record in processor.view.with_status(DocStatus.DELETE_HELD):
                held[record.key.agency_id] = held.get(record.key.agency_id, 0) + 1
            for record in processor.view.parked():
                reason = (record.parked_reason or "unknown").split(":", 1)[0]
                parked[reason] = parked.get(reason, 0) + 1
        for name, count in by_status.items():
            m.state_documents.labels(name).set(count)
        for agency, count in held.items():
            m.held_deletions.labels(agency).set(count)
        m.parked_documents.clear()
        for reason, count in parked.items():
            m.parked_documents.labels(reason).set(count)
        if self._scheduler is not None:
            snapshot = self._scheduler.snapshot()
            for lane, age in snapshot.oldest_pending_seconds.items():
                m.oldest_pending.labels(lane.value).set(age or 0.0)


def _plain(value: Any) -> Any:
    if value is None:
        return None
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted(_plain(v) for v in value)
    return value
