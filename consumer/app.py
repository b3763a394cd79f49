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
from importlib.metadata import version
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CollectorRegistry

from consumer.breaker import BreakerPolicy
from consumer.changelog import (
    ChangelogWriter,
    TopicLayout,
    check_topics,
    dead_letter_room,
    restore_partition,
)
from consumer.commands import HeldAction, OperatorCommand, send_command
from consumer.executor import OperationExecutor
from consumer.failures import classify
from consumer.guard import DeletionGuard
from consumer.ingest import Ingest
from consumer.manifest import ManifestAssembler
from consumer.metrics import RelayMetrics
from consumer.observers import MetricsObserver, rate_limits
from consumer.opshttp import OpsServer
from consumer.partner.client import ChouetteCoproClient
from consumer.partner.content import ContentFetcher
from consumer.partner.keys import ApiKeyStore
from consumer.processor import COMMANDS, DOCUMENTS, MANIFESTS, PartitionProcessor
from consumer.reconcile import reconcile_partition
from consumer.routing import RoutingTable
from consumer.scheduler import RetryPolicy, Scheduler
from consumer.settings import Settings
from consumer.sinks import DeadLetterSink
from consumer.state import DocStatus
from consumer.view import PublishedView

log = logging.getLogger(__name__)

RELAY_VERSION = version("chouette-relay")


class Relay:
    """The running service: what the ops server and the CLI act on."""

    def __init__(self, *, settings: Settings, routing: RoutingTable, api_keys: ApiKeyStore) -> None:
        self.settings = settings
        self.routing = routing
        self.api_keys = api_keys
        self.registry = CollectorRegistry()
        self.metrics = RelayMetrics.create(self.registry, version=RELAY_VERSION)
        for agency_id in routing.agencies:
            self.metrics.circuit_open.labels(agency_id).set(0)
        self.stopping = asyncio.Event()
        self.ops_port: int | None = None
        self.failure: BaseException | None = None
        self._ingest: Ingest | None = None
        self._scheduler: Scheduler | None = None
        self._producer: AIOKafkaProducer | None = None
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
                "committable": proc.committable(),
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
                found.append(
                    {
                        "agency": record.key.agency_id,
                        "building": record.key.building_id,
                        "document": record.key.document_id,
                        # A parked record without its document is a withdrawal refused.
                        "operation": "upload" if record.document is not None else "withdraw",
                        "reason": record.parked_reason,
                    }
                )
        return found

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
        if self._producer is None:
            raise RuntimeError("the relay is not running")
        command = OperatorCommand(
            command=HeldAction.DISCARD if discard else HeldAction.RELEASE,
            agency_id=agency_id,
            building_id=building_id,
            requested_at=dt.datetime.now(dt.UTC),
            requested_by=requested_by,
        )
        partition, offset = await send_command(
            self._producer, self.settings.kafka.commands_topic, command
        )
        return {"partition": partition, "offset": offset}

    # -- lifecycle -----------------------------------------------------------------------------
    async def run(self) -> None:
        s = self.settings
        layout = await self._check_topics()
        log.info("topics checked", extra={"partitions": layout.input_partitions})
        producer, consumer = _kafka_clients(s)
        self._producer = producer
        observer = MetricsObserver(self.metrics)
        async with contextlib.AsyncExitStack() as stack:
            await producer.start()
            stack.push_async_callback(producer.stop)
            partner = await stack.enter_async_context(
                ChouetteCoproClient(
                    base_url=s.partner.base_url,
                    api_keys=self.api_keys,
                    timeout_s=s.partner.timeout_s,
                    user_agent=f"chouette-relay/{RELAY_VERSION}",
                    observe=observer.request,
                )
            )
            fetcher = await stack.enter_async_context(
                ContentFetcher(
                    allowed_hosts=s.content.allowed_hosts,
                    max_bytes=s.content.max_bytes,
                    timeout_s=s.content.fetch_timeout_s,
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
            )
            build_processor = functools.partial(
                self._build_processor,
                producer=producer,
                scheduler=scheduler,
                partner=partner,
                fetcher=fetcher,
                dead_letters=dead_letters,
            )
            self._ingest = ingest = Ingest(
                consumer=consumer,
                topics=list(self._topics.values()),
                processor_factory=build_processor,
                metrics=self.metrics,
                commit_interval_s=s.kafka.commit_interval_s,
                max_records=s.kafka.max_poll_records,
            )
            ingest.subscribe()
            await consumer.start()
            stack.push_async_callback(consumer.stop)
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
    ) -> PartitionProcessor:
        """Restore one partition's view, settle its upload intents, and build its processor."""
        s = self.settings
        guard, topics = self._guard, self._topics
        view = PublishedView()
        writer = ChangelogWriter(producer=producer, topic=s.kafka.state_topic, partition=partition)
        self._restoring[partition] = 0.0

        def progress(done: int, total: int) -> None:
            ratio = 1.0 if total == 0 else done / total
            self._restoring[partition] = ratio
            self.metrics.restore_progress.labels(str(partition)).set(ratio)

        applied = await restore_partition(
            bootstrap_servers=s.kafka.bootstrap_servers,
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
        )
        retried = processor.retry_parked()
        if retried:
            log.info("parked documents sent again", extra={"documents": retried})
        return processor

    async def _check_topics(self) -> TopicLayout:
        s = self.settings
        return await check_topics(
            bootstrap_servers=s.kafka.bootstrap_servers,
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
        """Infrastructure failed under partition work (the state topic unreachable once the
        producer's retries are spent): stop (drain, commit what is done) and exit 1.

        Everything that belongs to one record or one document is parked or dead-lettered where
        it happens (``consumer.failures``); only what no record can be blamed for gets here.
        """
        reason = classify(error).reason if isinstance(error, Exception) else "cancelled"
        log.critical("infrastructure failure; stopping", exc_info=error, extra={"reason": reason})
        self.failure = error
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)


def _kafka_clients(s: Settings) -> tuple[AIOKafkaProducer, AIOKafkaConsumer]:
    """The producer (state and dead letters, idempotent, acks=all) and the group consumer."""
    producer = AIOKafkaProducer(
        bootstrap_servers=s.kafka.bootstrap_servers,
        client_id=s.kafka.client_id,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_request_size=_max_request_size(s),
    )
    consumer = AIOKafkaConsumer(
        bootstrap_servers=s.kafka.bootstrap_servers,
        group_id=s.kafka.group_id,
        client_id=s.kafka.client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=s.kafka.max_poll_records,
        session_timeout_ms=s.kafka.session_timeout_ms,
        fetch_max_bytes=max(s.kafka.max_value_bytes * 4, 52_428_800),
        max_partition_fetch_bytes=max(s.kafka.max_value_bytes * 2, 1_048_576),
    )
    return producer, consumer


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
    return value
