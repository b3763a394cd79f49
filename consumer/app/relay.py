"""The composition root: builds every object of the running relay and owns their lifecycles.

Resources start in dependency order (producer, partner client, scheduler, consumer, ops server)
and stop in reverse. One ``TaskGroup`` owns the long-running loops. SIGTERM and SIGINT only set an
event; the shutdown path drains in-flight work within the drain timeout, commits, and leaves the
consumer group. Kept whole (about 340 lines): building and wiring read in one place;
its control surface and its group membership are the halves in ``control`` and ``membership``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import signal
from collections.abc import Mapping

from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from consumer.app.clients import _kafka_clients, _stop_within
from consumer.app.control import RELAY_VERSION, RelayControl
from consumer.app.membership import GroupMember
from consumer.app.observers import MetricsObserver, rate_limits
from consumer.app.partition import partition_processor
from consumer.app.processor import COMMANDS, DOCUMENTS, MANIFESTS, PartitionProcessor
from consumer.core.audit import Resend
from consumer.core.guard import DeletionGuard
from consumer.core.routing import RoutingTable
from consumer.core.state import DocStatus
from consumer.core.view import PublishedView
from consumer.errors import KafkaUnavailableError
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
from consumer.kafka.resend import find_resend
from consumer.kafka.startup import start_client
from consumer.metrics import RelayMetrics
from consumer.ops.admin import Operator
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
# How often a partition whose upload intents wait for the partner says so.
RECONCILE_NOTICE_S = 60.0
# Unreadable state records kept per partition for /status (all are logged and counted).
UNREADABLE_SHOWN = 100


class Relay(RelayControl, GroupMember):
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
        self.metrics.rate_share.set(1.0)
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
        settling = asyncio.ensure_future(
            reconcile_partition(
                view=view,
                writer=writer,
                scheduler=scheduler,
                partner=partner,
                not_before=newest + s.partner.timeout_s + s.partner.in_doubt_settle_s,
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
        )
        # Paused agencies are known before any of this partition's work is submitted. (Upload
        # intents above are only looked up, which sends nothing.)
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
