"""The composition root: builds every object of the running relay and owns their lifecycles.

Resources start in dependency order (producer, partner client, scheduler, consumer, ops server)
and stop in reverse. One ``TaskGroup`` owns the long-running loops. SIGTERM and SIGINT only set an
event; the shutdown path drains in-flight work within the drain timeout, commits, and leaves the
consumer group. ``Relay`` is also what the ops server and the CLI act on: its status, the
paused agencies, held and parked documents, the audit, the gauges derived from the views, and
leaving the consumer group. One class, kept whole: building, wiring and control read in one place.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import signal
from collections.abc import Iterable, Mapping
from importlib.metadata import version
from typing import Any

from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from consumer.app.clients import _kafka_clients, _stop_within
from consumer.app.heap import keep_restored, tune_collector
from consumer.app.observers import MetricsObserver, rate_limits
from consumer.app.partition import partition_processor
from consumer.app.processor import COMMANDS, DOCUMENTS, MANIFESTS, REFUSALS_KEPT, PartitionProcessor
from consumer.core.audit import Resend
from consumer.core.commands import AgencyAction, HeldAction
from consumer.core.guard import DeletionGuard
from consumer.core.routing import RoutingTable
from consumer.core.state import DocStatus
from consumer.core.view import PublishedView
from consumer.errors import ConfigError, KafkaUnavailableError
from consumer.failures import classify
from consumer.kafka.brokerwatch import BrokerWatch
from consumer.kafka.changelog import (
    ChangelogWriter,
    TopicLayout,
    UnreadableRecord,
    check_topics,
    dead_letter_room,
    restore_partition,
)
from consumer.kafka.connection import kafka_connection
from consumer.kafka.deadletters import DeadLetterSink
from consumer.kafka.ingest import Ingest
from consumer.kafka.membership import leave_group
from consumer.kafka.outcomes import OutcomeWriter
from consumer.kafka.resend import find_resend
from consumer.kafka.startup import start_client
from consumer.metrics import RelayMetrics
from consumer.ops.admin import Operator, held_entries, parked_entry
from consumer.ops.audit import run_audit
from consumer.ops.looplag import watch_loop_lag
from consumer.ops.opshttp import OpsServer
from consumer.partner.answers import RemoteDocument
from consumer.partner.breaker import BreakerPolicy
from consumer.partner.client import ChouetteCoproClient
from consumer.partner.content import ContentFetcher
from consumer.partner.copies import find_copies
from consumer.partner.keys import ApiKeyStore
from consumer.partner.reconcile import reconcile_partition
from consumer.partner.scheduler import RetryPolicy, Scheduler
from consumer.partner.tls import https_context
from consumer.settings import Settings

log = logging.getLogger(__name__)

# Not ready when the broker has not answered for this long (or 5 commit intervals if longer).
READINESS_WINDOW_S = 10.0
# The values of the paused gauge's scope label: a whole pause, or the first publication alone.
PAUSE_SCOPES = ("live_and_backfill", "backfill")
# How often a partition whose upload intents wait for the partner says so.
RECONCILE_NOTICE_S = 60.0
# Unreadable state records kept per partition for /status (all are logged and counted).
UNREADABLE_SHOWN = 100


RELAY_VERSION = version("chouette-relay")


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


LEAVE_GROUP_TIMEOUT_S = 5.0  # best effort: the session timeout ends the membership anyway


class Relay:
    """The running service: what the ops server and the CLI act on."""

    def __init__(self, *, settings: Settings, routing: RoutingTable, api_keys: ApiKeyStore) -> None:
        self.settings = settings
        self.routing = routing
        self.api_keys = api_keys
        # Built here so that bad security settings stop start-up before any connection.
        self.connection = kafka_connection(settings.kafka)
        self._partner_tls = https_context(settings.partner.ca_file, "PARTNER__CA_FILE")
        self._content_tls = https_context(settings.content.ca_file, "CONTENT__CA_FILE")
        self.registry = CollectorRegistry()
        self.metrics = RelayMetrics.create(
            self.registry, version=RELAY_VERSION, agencies=routing.agencies
        )
        self.metrics.rate_share.set(1.0)
        for agency_id in routing.agencies:
            self.metrics.circuit_open.labels(agency_id).set(0)
            for scope in PAUSE_SCOPES:
                self.metrics.agency_paused.labels(agency_id, scope).set(0)
            self.metrics.awaiting_approval.labels(agency_id).set(0)
        self.stopping = asyncio.Event()
        self.ops_port: int | None = None
        self.failure: BaseException | None = None
        self._ingest: Ingest[PartitionProcessor] | None = None
        self._scheduler: Scheduler | None = None
        self._producer: AIOKafkaProducer | None = None
        self._operator: Operator | None = None
        self._restoring: dict[int, float] = {}
        # Agencies whose waiting first publication this replica has said (once while it waits).
        self._announced: set[str] = set()
        self._unreadable: dict[int, collections.deque[UnreadableRecord]] = {}
        self._guard = DeletionGuard(
            max_share=settings.guard.max_delete_share, min_count=settings.guard.min_deletes
        )
        self._topics = {
            DOCUMENTS: settings.kafka.documents_topic,
            MANIFESTS: settings.kafka.manifests_topic,
            COMMANDS: settings.kafka.commands_topic,
        }

    # -- lifecycle -----------------------------------------------------------------------------
    async def run(self) -> None:
        s = self.settings
        tune_collector()
        layout = await self._check_topics()
        log.info("topics checked", extra={"partitions": layout.input_partitions})
        producer, consumer = _kafka_clients(s, self.connection)
        self._producer = producer
        self._operator = Operator(s, producer=producer, routing=self.routing)
        observer = MetricsObserver(self.metrics)
        watch = BrokerWatch(
            bootstrap_servers=s.kafka.bootstrap_servers,
            unavailable_timeout_s=s.kafka.unavailable_timeout_s,
            window_s=max(READINESS_WINDOW_S, 5 * s.kafka.commit_interval_s),
            metrics=self.metrics,
        )
        async with contextlib.AsyncExitStack() as stack:
            await start_client(producer, self.connection)
            stack.push_async_callback(_stop_within, producer.stop, "producer", s.drain_timeout_s)
            partner = await stack.enter_async_context(
                ChouetteCoproClient(
                    base_url=s.partner.base_url,
                    api_keys=self.api_keys,
                    timeout_s=s.partner.timeout_s,
                    max_answer_bytes=s.partner.max_answer_bytes,
                    user_agent=f"chouette-relay/{RELAY_VERSION}",
                    observe=observer.request,
                    ssl_context=self._partner_tls,
                )
            )
            fetcher = await stack.enter_async_context(
                ContentFetcher(
                    allowed_hosts=s.content.allowed_hosts,
                    max_bytes=s.content.max_bytes,
                    timeout_s=s.content.fetch_timeout_s,
                    in_hand_per_agency=s.content.in_hand_per_agency,
                    ssl_context=self._content_tls,
                )
            )
            default_limit, limits = rate_limits(self.routing, s.partner)
            # Its workers run under the TaskGroup below: a crashed worker stops the relay.
            self._scheduler = scheduler = Scheduler(
                concurrency=s.partner.concurrency,
                default_rate_limit=default_limit,
                rate_limits=limits,
                breaker=BreakerPolicy(
                    failure_threshold=s.partner.breaker_failures,
                    cooldown_seconds=s.partner.breaker_cooldown_s,
                ),
                retry=RetryPolicy(in_doubt_seconds=s.partner.in_doubt_settle_s),
                observer=observer,
            )
            stack.push_async_callback(scheduler.close)
            dead_letters = await stack.enter_async_context(
                DeadLetterSink(
                    producer=producer,
                    connection=self.connection,
                    topic=s.kafka.dead_letter_topic,
                    metrics=self.metrics,
                    relay_version=RELAY_VERSION,
                    max_bytes=dead_letter_room(s.kafka.max_value_bytes) - 16_384,
                    watch=watch,
                )
            )
            build_processor = functools.partial(
                self._build_processor,
                producer=producer,
                scheduler=scheduler,
                partner=partner,
                fetcher=fetcher,
                dead_letters=dead_letters,
                watch=watch,
            )
            self._ingest = ingest = Ingest(
                consumer=consumer,
                topics=list(self._topics.values()),
                processor_factory=build_processor,
                metrics=self.metrics,
                commit_interval_s=s.kafka.commit_interval_s,
                max_records=s.kafka.max_poll_records,
                max_pending=(s.kafka.max_pending_live, s.kafka.max_pending_backfill),
                max_pending_total=s.kafka.max_pending_total,
                max_pending_inline_bytes=s.kafka.max_pending_inline_bytes,
                watch=watch,
                probe=consumer.topics,
                on_unavailable=self._fail,
                on_failure=self._fail,
                on_assignment=functools.partial(
                    self._share_rates, partitions=layout.input_partitions
                ),
            )
            ingest.subscribe()
            await start_client(consumer, self.connection)
            stack.push_async_callback(self._leave_group)  # after the consumer's stop, below
            stack.push_async_callback(_stop_within, consumer.stop, "consumer", s.drain_timeout_s)
            ops = await stack.enter_async_context(
                OpsServer(
                    control=self,
                    registry=self.registry,
                    host=s.http.host,
                    port=s.http.port,
                    admin_token=s.http.admin_token(),
                )
            )
            self.ops_port = ops.port
            try:
                async with asyncio.TaskGroup() as tasks:
                    workers = tasks.create_task(scheduler.run(), name="scheduler")
                    consuming = tasks.create_task(ingest.run(), name="ingest")
                    housekeeping = tasks.create_task(ingest.run_housekeeping(), name="housekeeping")
                    gauges = tasks.create_task(self._refresh_gauges(), name="gauges")
                    tasks.create_task(watch_loop_lag(self.metrics, stopping=self.stopping))
                    await self.stopping.wait()
                    log.info("stopping: draining in-flight work")
                    ingest.stop()
                    await consuming
                    await ingest.shutdown(s.drain_timeout_s)
                    await housekeeping
                    gauges.cancel()
                    workers.cancel()
            except* Exception as failed:
                # What a record's boundary raised again is infrastructure: say so in one line.
                for error in failed.exceptions:
                    self._fail(error)
                raise
            log.info("stopped cleanly")

    async def _build_processor(
        self,
        partition: int,
        *,
        producer: AIOKafkaProducer,
        scheduler: Scheduler,
        partner: ChouetteCoproClient,
        fetcher: ContentFetcher,
        dead_letters: DeadLetterSink,
        watch: BrokerWatch,
    ) -> PartitionProcessor:
        """Restore one partition's view, settle its upload intents, and build its processor."""
        s = self.settings
        guard, topics = self._guard, self._topics
        view = PublishedView()
        writer = ChangelogWriter(
            producer=producer, topic=s.kafka.state_topic, partition=partition, watch=watch
        )
        self._restoring[partition] = 0.0

        def progress(done: int, total: int) -> None:
            ratio = 1.0 if total == 0 else done / total
            self._restoring[partition] = ratio
            self.metrics.restore_progress.labels(str(partition)).set(ratio)

        skipped = self._unreadable[partition] = collections.deque(maxlen=UNREADABLE_SHOWN)
        unreadable = self.metrics.state_records_unreadable.labels(str(partition))

        def skip(record: UnreadableRecord) -> None:
            skipped.append(record)
            unreadable.inc()

        applied, newest = await restore_partition(
            connection=self.connection,
            topic=s.kafka.state_topic,
            partition=partition,
            view=view,
            on_progress=progress,
            on_unreadable=skip,
        )
        self.metrics.restore_records.inc(applied)
        keep_restored()
        settling = asyncio.ensure_future(
            reconcile_partition(
                view=view,
                writer=writer,
                scheduler=scheduler,
                partner=partner,
                not_before=newest + s.partner.timeout_s + s.partner.in_doubt_settle_s,
                # Nothing of a paused first publication reaches the partner, not even a lookup.
                deferred=view.backfill_paused_agencies(),
            )
        )
        try:
            # The partner away holds this partition unready (and no other): say so while it lasts.
            while not (await asyncio.wait({settling}, timeout=RECONCILE_NOTICE_S))[0]:
                log.warning(
                    "partition waits for the partner to settle its upload intents",
                    extra={"partition": partition, "intents": view.count(DocStatus.UPLOADING)},
                )
        finally:
            settling.cancel()
        settling.result()
        self._restoring.pop(partition, None)
        log.info(
            "partition restored",
            extra={
                "partition": partition,
                "records": applied,
                "documents": view.size,
            },
        )
        processor = partition_processor(
            partition,
            settings=s,
            topics=topics,
            routing=self.routing,
            guard=guard,
            view=view,
            writer=writer,
            scheduler=scheduler,
            partner=partner,
            content=fetcher,
            dead_letters=dead_letters,
            metrics=self.metrics,
            on_failure=self._fail,
            on_command=self._on_command,
            find_resend=functools.partial(self._find_resend, partition),
            find_copies=functools.partial(self._find_copies, scheduler, partner),
            write_outcome=OutcomeWriter(
                producer=producer, topic=s.kafka.commands_topic, watch=watch
            ).submit,
        )
        # Paused agencies are known before any of this partition's work is submitted. (Upload
        # intents above are only looked up, which sends nothing, those of a paused first
        # publication not even that.)
        self.sync_controls(view)
        retried = processor.retry_parked()
        if retried:
            log.info("parked documents sent again", extra={"documents": retried})
        return processor

    async def _find_resend(
        self,
        partition: int,
        until: Mapping[str, tuple[str, int]],
        place: tuple[str, str],
        wanted: frozenset[str],
    ) -> Mapping[str, Resend]:
        """A repair's documents as ``partition`` of the input still describes them."""
        return await find_resend(
            connection=self.connection,
            partition=partition,
            until=until,
            place=place,
            wanted=wanted,
            max_value_bytes=self.settings.kafka.max_value_bytes,
        )

    async def _find_copies(
        self,
        scheduler: Scheduler,
        partner: ChouetteCoproClient,
        agency_id: str,
        condominium_id: str,
        references: frozenset[str],
    ) -> Mapping[str, list[RemoteDocument]]:
        """A repair's references as the partner holds them, looked up at the agency's pace."""
        return await find_copies(
            scheduler=scheduler,
            partner=partner,
            agency_id=agency_id,
            condominium_id=condominium_id,
            references=references,
        )

    async def _check_topics(self) -> TopicLayout:
        s = self.settings
        return await check_topics(
            connection=self.connection,
            documents_topic=s.kafka.documents_topic,
            manifests_topic=s.kafka.manifests_topic,
            state_topic=s.kafka.state_topic,
            dead_letter_topic=s.kafka.dead_letter_topic,
            commands_topic=s.kafka.commands_topic,
            create_missing_state=s.kafka.create_state_topic,
            max_value_bytes=s.kafka.max_value_bytes,
        )

    async def _refresh_gauges(self) -> None:
        """Gauges derived from the views and the scheduler, refreshed every couple of seconds."""
        while True:
            self.refresh_gauges()
            await asyncio.sleep(2.0)

    def _fail(self, error: BaseException) -> None:
        """Infrastructure failed under partition work, or Kafka stayed away longer than the
        bound: stop (drain, commit what can be) and exit 1.

        Everything that belongs to one record or one document is parked or dead-lettered where
        it happens (``consumer.failures``); only what no record can be blamed for gets here.
        """
        if self.failure is not None:
            return
        if isinstance(error, KafkaUnavailableError):
            log.critical("Kafka unreachable for too long; stopping", extra={"reason": str(error)})
        else:
            reason = classify(error).reason if isinstance(error, Exception) else "cancelled"
            log.critical(
                "infrastructure failure; stopping", exc_info=error, extra={"reason": reason}
            )
        self.failure = error
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)

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
                "pending_inline_bytes": proc.pending_inline_bytes,
                "late_copy_checks_owed": proc.late_copy_checks_owed,
                "reading_paused": ingest is not None and ingest.reading_paused(p),
                "committable": proc.committable(),
                "paused": sorted(proc.view.paused_agencies()),
                "backfill_paused": sorted(proc.view.backfill_paused_agencies()),
            }
            for p, proc in sorted(processors.items())
        }
        snapshot = self._scheduler.snapshot() if self._scheduler else None
        return {
            "version": RELAY_VERSION,
            "ready": self.is_ready(),
            "restoring": {str(p): r for p, r in self._restoring.items()},
            "over_budget": ingest is not None and ingest.over_budget,
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
            "backfill_paused": sorted(self.backfill_paused_agencies()),
            "awaiting_approval": self.awaiting_approval(),
            "held": self.held(),
            "parked": self.parked(),
            "refused_commands": self.refused_commands(),
        }

    def refused_commands(self) -> dict[str, Any]:
        """Commands this replica's partitions refused: how many, and the newest first."""
        processors = list(self._ingest.processors.values()) if self._ingest else []
        refused = sorted(
            (entry for processor in processors for entry in processor.refused),
            key=lambda entry: entry.at,
            reverse=True,
        )[:REFUSALS_KEPT]
        return {
            "total": sum(processor.refused_total for processor in processors),
            "newest": [
                {
                    "at": entry.at.isoformat(),
                    "partition": entry.partition,
                    "command": entry.command.command.value,
                    "agency": entry.command.agency_id,
                    "building": entry.command.building_id,
                    "reason": entry.refusal.value,
                    "requested_by": entry.command.requested_by,
                    "requested_at": entry.command.requested_at.isoformat(),
                }
                for entry in refused
            ],
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

    def backfill_paused_agencies(self, *extra: PublishedView) -> set[str]:
        """Agencies whose first publication alone is paused in a view this replica owns."""
        views = [p.view for p in self._ingest.processors.values()] if self._ingest else []
        found = (view.backfill_paused_agencies() for view in [*views, *extra])
        return set().union(*found) - self.paused_agencies(*extra)

    def sync_controls(self, *extra: PublishedView) -> None:
        """Hand the agencies paused in the owned views to the scheduler and the gauge."""
        paused = self.paused_agencies(*extra)
        backfill_paused = self.backfill_paused_agencies(*extra)
        scheduler = self._scheduler
        if scheduler is not None and (
            scheduler.paused != paused or scheduler.backfill_paused != backfill_paused
        ):
            scheduler.set_paused(frozenset(paused), backfill_only=frozenset(backfill_paused))
            if paused or backfill_paused:
                log.info(  # as asked; an empty list is left out
                    "paused agencies",
                    extra={
                        name: sorted(agencies)
                        for name, agencies in (
                            ("agencies", paused),
                            ("backfill_only", backfill_paused),
                        )
                        if agencies
                    },
                )
            else:
                log.info("no agency paused")
            for processor in self._ingest.processors.values() if self._ingest else ():
                processor.resume()  # a resumed agency's queued work starts
        awaiting = self.awaiting_approval()
        # One series per agency of the routing file: a record of any other agency in a view
        # (written before replicas refused unknown agencies) adds none.
        for agency_id in self.routing.agencies:
            gauge = self.metrics.agency_paused
            gauge.labels(agency_id, "live_and_backfill").set(1 if agency_id in paused else 0)
            gauge.labels(agency_id, "backfill").set(1 if agency_id in backfill_paused else 0)
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
        parked: dict[tuple[str, str], int] = {}
        for processor in processors:
            for status, count in processor.view.counts().items():
                by_status[status.value] = by_status.get(status.value, 0) + count
            for record in processor.view.with_status(DocStatus.DELETE_HELD):
                held[record.key.agency_id] = held.get(record.key.agency_id, 0) + 1
            for record in processor.view.parked():
                reason = (record.parked_reason or "unknown").split(":", 1)[0]
                labels = m.agency_label(record.key.agency_id), reason
                parked[labels] = parked.get(labels, 0) + 1
        for name, count in by_status.items():
            m.state_documents.labels(name).set(count)
        for agency, count in held.items():
            m.held_deletions.labels(agency).set(count)
        views = [processor.view for processor in processors]
        awaiting: collections.Counter[str] = collections.Counter()
        for processor in processors:
            awaiting.update(processor.awaiting_uploads())
        progress = _publication_progress(views, self.routing.agencies, awaiting)
        for agency, (done, planned) in progress.items():
            m.publication_done.labels(agency).set(done)
            m.publication_planned.labels(agency).set(planned)
        self._announce_awaiting(awaiting)
        m.parked_documents.clear()
        for (agency, reason), count in parked.items():
            m.parked_documents.labels(agency, reason).set(count)
        if self._scheduler is not None:
            snapshot = self._scheduler.snapshot()
            for lane, age in snapshot.oldest_pending_seconds.items():
                m.oldest_pending.labels(lane.value).set(age or 0.0)

    def _announce_awaiting(self, planned: Mapping[str, int]) -> None:
        """One INFO line per agency whose first publication awaits approval, across the
        partitions this replica owns, once they are restored and their manifests read to the
        end (so that the line counts what waits, not what was read so far); again only after it
        stopped waiting (approved) and waits anew."""
        awaiting = self.awaiting_approval()
        self._announced &= set(awaiting)
        ingest = self._ingest
        if ingest is None or not ingest.ready:
            return
        if not all(processor.manifests_caught_up for processor in ingest.processors.values()):
            return
        for agency, buildings in awaiting.items():
            if agency in self._announced:
                continue
            self._announced.add(agency)
            log.info(
                "first publication awaits an operator's approval",
                extra={
                    "agency": agency,
                    "buildings": len(buildings),
                    "documents": planned.get(agency, 0),
                    "hint": f"chouette-relay plan --agency {agency}, then approve",
                },
            )

    def _share_rates(self, owned: set[int], *, partitions: int) -> None:
        """Each agency's rate is the partner's for its key, across replicas: this replica sends
        at the part of it its input partitions are of all (at most the rate, whatever the
        number of replicas; an agency whose buildings sit on one replica's partitions gets less)."""
        share = len(owned) / partitions
        if self._scheduler is None or not owned or share == self._scheduler.rate_share:
            return
        self._scheduler.set_rate_share(share)
        self.metrics.rate_share.set(share)
        log.info("partner rates shared", extra={"share": round(share, 4), "partitions": len(owned)})

    async def _leave_group(self) -> None:
        """A static member that stops cleanly leaves, so that its partitions need not wait."""
        kafka = self.settings.kafka
        if kafka.group_instance_id is None or not kafka.leave_group_on_stop:
            return
        if not self.stopping.is_set() or self.failure is not None:
            return  # a failing relay keeps its membership: the same pod comes back
        await leave_group(
            self.connection,
            group_id=kafka.group_id,
            instance_id=kafka.group_instance_id,
            timeout_s=LEAVE_GROUP_TIMEOUT_S,
        )


def _publication_progress(
    views: Iterable[PublishedView], agencies: Iterable[str], awaiting: Mapping[str, int]
) -> dict[str, tuple[int, int]]:
    """Status's progress of each agency in these views: documents on the partner, out of those,
    the ones being sent (applying a manifest marks its uploads as being sent at once) and those
    that manifests awaiting approval would send (``awaiting``), so the planned total is known
    from the first manifest and does not grow with the approval. Read from the views and the
    manifests read again, it holds across restarts and whenever the first publication began."""
    done = dict.fromkeys(agencies, 0)
    sending = {agency: awaiting.get(agency, 0) for agency in done}
    for view in views:
        for agency, count in view.on_partner_by_agency().items():
            if agency in done:
                done[agency] += count
        for record in view.with_status(DocStatus.UPLOADING):
            if record.key.agency_id in sending:
                sending[record.key.agency_id] += 1
    return {agency: (count, count + sending[agency]) for agency, count in done.items()}
