"""The composition root: builds every object of the running relay and owns their lifecycles.

Resources start in dependency order (producer, partner client, scheduler, consumer, ops server)
and stop in reverse. One ``TaskGroup`` owns the long-running loops. SIGTERM and SIGINT only set an
event; the shutdown path drains in-flight work within the drain timeout, commits, and leaves the
consumer group.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import signal
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from prometheus_client import CollectorRegistry

from consumer.app.observers import MetricsObserver, rate_limits
from consumer.app.processor import COMMANDS, DOCUMENTS, MANIFESTS, PartitionProcessor
from consumer.core.commands import AgencyAction, HeldAction
from consumer.core.guard import DeletionGuard
from consumer.core.manifest import ManifestAssembler
from consumer.core.routing import RoutingTable
from consumer.core.state import DocStatus
from consumer.core.view import PublishedView
from consumer.errors import ConfigError, KafkaUnavailableError
from consumer.failures import classify
from consumer.kafka.brokerwatch import BrokerWatch
from consumer.kafka.changelog import (
    ChangelogWriter,
    TopicLayout,
    check_topics,
    dead_letter_room,
    restore_partition,
)
from consumer.kafka.connection import KafkaConnection, https_context, kafka_connection, start_client
from consumer.kafka.deadletters import DeadLetterSink
from consumer.kafka.ingest import Ingest
from consumer.metrics import RelayMetrics
from consumer.ops.admin import Operator, parked_entry
from consumer.ops.audit import run_audit
from consumer.ops.opshttp import OpsServer
from consumer.partner.breaker import BreakerPolicy
from consumer.partner.client import ChouetteCoproClient
from consumer.partner.content import ContentFetcher
from consumer.partner.executor import OperationExecutor
from consumer.partner.keys import ApiKeyStore
from consumer.partner.reconcile import reconcile_partition
from consumer.partner.scheduler import RetryPolicy, Scheduler
from consumer.settings import Settings

log = logging.getLogger(__name__)

RELAY_VERSION = version("chouette-relay")
# Not ready when the broker has not answered for this long (or 5 commit intervals if longer).
READINESS_WINDOW_S = 10.0


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
        self.metrics = RelayMetrics.create(self.registry, version=RELAY_VERSION)
        for agency_id in routing.agencies:
            self.metrics.circuit_open.labels(agency_id).set(0)
            self.metrics.agency_paused.labels(agency_id).set(0)
            self.metrics.awaiting_approval.labels(agency_id).set(0)
        self.stopping = asyncio.Event()
        self.ops_port: int | None = None
        self.failure: BaseException | None = None
        self._ingest: Ingest[PartitionProcessor] | None = None
        self._scheduler: Scheduler | None = None
        self._producer: AIOKafkaProducer | None = None
        self._operator: Operator | None = None
        self._restoring: dict[int, float] = {}
        self._guard = DeletionGuard(
            max_share=settings.guard.max_delete_share, min_count=settings.guard.min_deletes
        )
        self._topics = {
            DOCUMENTS: settings.kafka.documents_topic,
            MANIFESTS: settings.kafka.manifests_topic,
            COMMANDS: settings.kafka.commands_topic,
        }

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
                "held_operations": proc.held_operations,
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
        found: dict[tuple[str, str], int] = {}
        for processor in self._ingest.processors.values() if self._ingest else ():
            for record in processor.view.with_status(DocStatus.DELETE_HELD):
                place = (record.key.agency_id, record.key.building_id)
                found[place] = found.get(place, 0) + 1
        return [{"agency": a, "building": b, "documents": n} for (a, b), n in sorted(found.items())]

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

    # -- lifecycle -----------------------------------------------------------------------------
    async def run(self) -> None:
        s = self.settings
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
                    ssl_context=self._content_tls,
                )
            )
            default_limit, limits = rate_limits(self.routing, s.partner)
            self._scheduler = scheduler = await stack.enter_async_context(
                Scheduler(
                    concurrency=s.partner.concurrency,
                    default_rate_limit=default_limit,
                    rate_limits=limits,
                    breaker=BreakerPolicy(
                        failure_threshold=s.partner.breaker_failures,
                        cooldown_seconds=s.partner.breaker_cooldown_s,
                    ),
                    observer=observer,
                )
            )
            dead_letters = DeadLetterSink(
                producer=producer,
                topic=s.kafka.dead_letter_topic,
                metrics=self.metrics,
                relay_version=RELAY_VERSION,
                max_bytes=dead_letter_room(s.kafka.max_value_bytes) - 16_384,
                watch=watch,
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
                watch=watch,
                probe=consumer.topics,
                on_unavailable=self._fail,
            )
            ingest.subscribe()
            await start_client(consumer, self.connection)
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
                    consuming = tasks.create_task(ingest.run(), name="ingest")
                    housekeeping = tasks.create_task(ingest.run_housekeeping(), name="housekeeping")
                    gauges = tasks.create_task(self._refresh_gauges(), name="gauges")
                    await self.stopping.wait()
                    log.info("stopping: draining in-flight work")
                    ingest.stop()
                    await consuming
                    await ingest.shutdown(s.drain_timeout_s)
                    await housekeeping
                    gauges.cancel()
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

        applied = await restore_partition(
            connection=self.connection,
            topic=s.kafka.state_topic,
            partition=partition,
            view=view,
            on_progress=progress,
        )
        self.metrics.restore_records.inc(applied)
        executor = OperationExecutor(
            view=view,
            writer=writer,
            scheduler=scheduler,
            partner=partner,
            content=fetcher,
            dead_letters=dead_letters,
            metrics=self.metrics,
            document_retry=RetryPolicy(
                max_attempts=s.content.unavailable_attempts,
                base_seconds=s.content.unavailable_backoff_s,
                cap_seconds=max(s.content.unavailable_backoff_s, 300.0),
            ),
            window=s.partner.window_per_partition,
        )
        await reconcile_partition(view=view, writer=writer, scheduler=scheduler, partner=partner)
        self._restoring.pop(partition, None)
        log.info(
            "partition restored",
            extra={"partition": partition, "records": applied, "documents": view.size},
        )
        processor = PartitionProcessor(
            partition=partition,
            topics=topics,
            view=view,
            assembler=ManifestAssembler(
                expiry=dt.timedelta(seconds=s.manifest.expiry_s),
                max_pending_items=s.manifest.max_pending_items,
            ),
            routing=self.routing,
            guard=guard,
            executor=executor,
            writer=writer,
            dead_letters=dead_letters,
            metrics=self.metrics,
            max_value_bytes=s.kafka.max_value_bytes,
            clock=lambda: dt.datetime.now(dt.UTC),
            on_failure=self._fail,
            max_clock_skew=dt.timedelta(seconds=s.manifest.max_clock_skew_s),
            on_command=self._on_command,
        )
        # Paused agencies are known before any of this partition's work is submitted. (Upload
        # intents above are only looked up, which sends nothing.)
        self.sync_controls(view)
        retried = processor.retry_parked()
        if retried:
            log.info("parked documents sent again", extra={"documents": retried})
        return processor

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


def _kafka_clients(
    s: Settings, connection: KafkaConnection
) -> tuple[AIOKafkaProducer, AIOKafkaConsumer]:
    """The producer (state and dead letters, idempotent, acks=all) and the group consumer.

    With a group instance id (the pod name), the consumer is a static member: a restart within
    the session timeout gets its partitions back without a rebalance of the whole group. The range
    assignor gives partition p of every input topic to the same replica (the topics have equal
    partition counts), which owns changelog partition p; round-robin would split them whenever
    the replica count does not divide the partition count.
    """
    producer = AIOKafkaProducer(
        **connection.options(),
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_request_size=_max_request_size(s),
    )
    consumer = AIOKafkaConsumer(
        **connection.options(),
        group_id=s.kafka.group_id,
        group_instance_id=s.kafka.group_instance_id,
        partition_assignment_strategy=(RangePartitionAssignor,),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=s.kafka.max_poll_records,
        session_timeout_ms=s.kafka.session_timeout_ms,
        fetch_max_bytes=max(s.kafka.max_value_bytes * 4, 52_428_800),
        max_partition_fetch_bytes=max(s.kafka.max_value_bytes * 2, 1_048_576),
    )
    return producer, consumer


async def _stop_within(stop: Callable[[], Awaitable[None]], what: str, timeout_s: float) -> None:
    """Stop an aiokafka client, giving up after ``timeout_s``: the producer flushes and the
    consumer leaves its group, which wait forever for a broker that is gone."""
    try:
        await asyncio.wait_for(stop(), timeout=timeout_s)
    except TimeoutError:
        log.error(  # noqa: TRY400 - the timeout is the whole story; its traceback says nothing
            "Kafka client did not stop in time; leaving it", extra={"client": what, "s": timeout_s}
        )


def _max_request_size(s: Settings) -> int:
    return max(dead_letter_room(s.kafka.max_value_bytes), 1_048_576)


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
