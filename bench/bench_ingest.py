"""Ingest throughput: the relay's read path beside a bare aiokafka consumer of the same topic.

One topic is filled with N valid document-created events (50,000 by default), then read
with the consumer configuration the relay uses (``getmany`` with ``max_poll_records``):
(a) a bare aiokafka consumer that only counts records;
(b) the relay's own ``Ingest`` loop and ``PartitionProcessor.handle``: decode and validate in one
    pass (msgspec), check key and headers, plan against the published view and route. Routing
    filters every document (its module is not enabled), so no partner call is made; whatever the
    planner records for a filtered document is applied to the view and written to a real
    changelog topic, and a record only counts once its offset is committable (its work done);
(c) ``decode_record`` and ``plan_document`` alone in a plain loop: the most (b) could reach.
Target: (b) spends at most 1/0.3 times the CPU time per record of (a). Each round runs (a), (b)
and (c) in turn and prints the ratio by CPU time (the machine may be shared, which skews wall
time); the best wall-clock rate of each is compared too.

Run with ``python -m bench.bench_ingest [--records N]``. The broker is the one named by
``CHOUETTE_RELAY_TEST_KAFKA``, or a local one started for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import hashlib
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import CollectorRegistry, Counter

from bench.common import Measure, delete_topics, on_a_broker, report, show
from consumer.app.partition import partition_processor
from consumer.app.processor import DOCUMENTS, MANIFESTS, PartitionProcessor
from consumer.core.decoding import decode_record
from consumer.core.events import DocumentCreated
from consumer.core.guard import DeletionGuard
from consumer.core.planning.documents import plan_document
from consumer.core.routing import RoutingTable
from consumer.core.view import PublishedView
from consumer.kafka.brokerwatch import BrokerWatch
from consumer.kafka.changelog import COMPACTED_TOPIC_CONFIG, ChangelogWriter
from consumer.kafka.connection import KafkaConnection
from consumer.kafka.deadletters import DeadLetterSink
from consumer.kafka.ingest import Ingest
from consumer.local.kafka import create_topics
from consumer.metrics import RelayMetrics
from consumer.partner.client import ChouetteCoproClient
from consumer.partner.content import ContentFetcher
from consumer.partner.keys import ApiKeyStore
from consumer.partner.scheduler import Scheduler
from consumer.settings import KafkaSettings, Settings

TARGET_RATIO = 0.3
AGENCY = "agence-bench"
BUILDINGS = 200
# Never called: routing filters every document before any partner operation is planned.
HEADERS = [("event-type", b"document-created"), ("schema-version", b"1")]
UNREACHED_PARTNER = "http://127.0.0.1:9/api/v1"
SETTINGS = Settings()  # the relay's defaults, as a deployment without overrides runs them
ROUTING = RoutingTable.from_mapping(
    {
        "agencies": {
            AGENCY: {
                "modules": ["ag"],  # the events are of module "contrats"
                "first_publication": "history",
                "condominia": {f"bat-{n}": str(9000 + n) for n in range(BUILDINGS)},
            }
        }
    }
)


@dataclass(frozen=True)
class Topics:
    documents: str
    manifests: str
    state: str
    dead_letters: str


def _event(n: int, occurred_at: dt.datetime) -> dict[str, Any]:
    digest = hashlib.sha256(f"bench/{n}".encode()).hexdigest()
    return {
        "schema_version": 1,
        "event_type": "document-created",
        "event_id": str(uuid.UUID(int=n + 1)),
        "occurred_at": occurred_at.isoformat().replace("+00:00", "Z"),
        "agency_id": AGENCY,
        "building_id": f"bat-{n % BUILDINGS}",
        "document": {
            "id": f"{uuid.UUID(int=n * 2_654_435_761 % 2**128)}:att-{n % 3}",
            "module": "contrats",
            "category": "Contrats",
            "title": f"Contrat d'entretien {n}",
            "document_date": "2025-05-01",
            "audience": "building",
            "content": {
                "media_type": "application/pdf",
                "size_bytes": 40_000 + n,
                "sha256": digest,
                "url": f"https://documents.lsc.example/{AGENCY}/{n}.pdf",
            },
        },
    }


def _records(records: int) -> list[tuple[bytes, bytes]]:
    """Key and value of every event, as LSC publishes them."""
    start = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
    encoded = []
    for n in range(records):
        event = _event(n, start + dt.timedelta(milliseconds=n))
        key = f"{event['agency_id']}:{event['building_id']}".encode()
        encoded.append((key, orjson.dumps(event)))
    return encoded


async def _fill(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """Publish the events in batches, each to the partition its key maps to (as LSC would)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1)
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(topic))
        partitioner = DefaultPartitioner()
        batches = {p: producer.create_batch() for p in partitions}
        sends = []
        for key, value in records:
            partition = partitioner(key, partitions, partitions)
            append = batches[partition].append
            if append(timestamp=None, key=key, value=value, headers=HEADERS) is None:
                sends.append(
                    await producer.send_batch(batches[partition], topic, partition=partition)
                )
                batches[partition] = producer.create_batch()
                batches[partition].append(timestamp=None, key=key, value=value, headers=HEADERS)
        for partition, batch in batches.items():
            if batch.record_count():
                sends.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


def _consumer(bootstrap: str, settings: KafkaSettings) -> AIOKafkaConsumer:
    """The relay's consumer configuration (see ``consumer.app.relay``), without a group: both sides
    are assigned every partition by hand, so neither waits for a group to form."""
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=settings.max_poll_records,
        fetch_max_bytes=max(settings.max_value_bytes * 4, 52_428_800),
        max_partition_fetch_bytes=max(settings.max_value_bytes * 2, 1_048_576),
    )


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    await consumer.topics()
    return [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]


async def read_bare(bootstrap: str, topics: Topics, records: int) -> tuple[Measure, float]:
    """(a) A bare consumer: ``getmany`` in a loop, counting records; and its CPU seconds."""
    settings = KafkaSettings()
    consumer = _consumer(bootstrap, settings)
    await consumer.start()
    try:
        consumer.assign(await _partitions(consumer, topics.documents))
        read = 0
        started, cpu = time.perf_counter(), time.process_time()
        while read < records:
            batches = await consumer.getmany(timeout_ms=200, max_records=settings.max_poll_records)
            for batch in batches.values():
                read += len(batch)
        return Measure(read, time.perf_counter() - started), time.process_time() - cpu
    finally:
        await consumer.stop()


async def read_relay(
    bootstrap: str, topics: Topics, records: int
) -> tuple[Measure, float, RelayMetrics]:
    """(b) The relay's ``Ingest`` loop feeding one ``PartitionProcessor`` per partition; and its
    CPU seconds."""
    settings = KafkaSettings()
    metrics = RelayMetrics.create(CollectorRegistry(), version="bench")
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_request_size=max(settings.max_value_bytes * 2, 1_048_576),
    )
    consumer = _consumer(bootstrap, settings)
    watch = BrokerWatch(
        bootstrap_servers=bootstrap, unavailable_timeout_s=300.0, window_s=10.0, metrics=metrics
    )
    async with contextlib.AsyncExitStack() as stack:
        await producer.start()
        stack.push_async_callback(producer.stop)
        partner = await stack.enter_async_context(
            ChouetteCoproClient(base_url=UNREACHED_PARTNER, api_keys=ApiKeyStore.from_mapping({}))
        )
        fetcher = await stack.enter_async_context(
            ContentFetcher(allowed_hosts=(), max_bytes=1024 * 1024)
        )
        scheduler = await stack.enter_async_context(Scheduler(concurrency=8))
        dead_letters = DeadLetterSink(
            producer=producer,
            connection=KafkaConnection(bootstrap_servers=bootstrap),
            topic=topics.dead_letters,
            metrics=metrics,
            relay_version="bench",
            max_bytes=1_000_000,
            watch=watch,
        )
        kinds = {DOCUMENTS: topics.documents, MANIFESTS: topics.manifests}

        async def build_processor(partition: int) -> PartitionProcessor:
            view = PublishedView()
            writer = ChangelogWriter(
                producer=producer, topic=topics.state, partition=partition, watch=watch
            )
            return partition_processor(
                partition,
                settings=SETTINGS,
                topics=kinds,
                routing=ROUTING,
                guard=DeletionGuard(max_share=0.2, min_count=10),
                view=view,
                writer=writer,
                scheduler=scheduler,
                partner=partner,
                content=fetcher,
                dead_letters=dead_letters,
                metrics=metrics,
                on_failure=_raise,
            )

        ingest = Ingest(
            consumer=consumer,
            topics=list(kinds.values()),
            processor_factory=build_processor,
            metrics=metrics,
            commit_interval_s=settings.commit_interval_s,
            max_records=settings.max_poll_records,
            watch=watch,
            probe=consumer.topics,
            on_unavailable=_raise,
        )
        await consumer.start()
        stack.push_async_callback(consumer.stop)
        documents = await _partitions(consumer, topics.documents)
        consumer.assign(documents + await _partitions(consumer, topics.manifests))
        ingest.assign({tp.partition for tp in documents})  # started by the loop below

        def done() -> int:
            return sum(
                processor.committable().get(topics.documents, 0)
                for processor in ingest.processors.values()
            )

        started, cpu = time.perf_counter(), time.process_time()
        running = asyncio.create_task(ingest.run(), name="ingest")
        while done() < records and not running.done():
            # Polled, not awaited: a record is finished when its offset becomes committable.
            await asyncio.wait({running}, timeout=0.01)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
        ingest.stop()
        await running
        for processor in ingest.processors.values():
            await processor.close()
        return Measure(done(), seconds), cpu_seconds, metrics


def _raise(error: BaseException) -> None:
    raise error


def decode_and_plan(records: list[tuple[bytes, bytes]]) -> Measure:
    """(c) The CPU floor of (b): ``decode_record`` and ``plan_document`` in a plain loop."""
    view = PublishedView()
    max_value_bytes = KafkaSettings().max_value_bytes
    started = time.perf_counter()
    for key, value in records:
        event = decode_record(
            topic_kind=DOCUMENTS,
            key=key,
            value=value,
            headers=HEADERS,
            max_value_bytes=max_value_bytes,
        )
        if not isinstance(event, DocumentCreated):
            raise TypeError(f"the bench event did not decode: {event}")
        plan_document(view, ROUTING, event)
    return Measure(len(records), time.perf_counter() - started)


def _totals(counter: Counter) -> dict[str, float]:
    """A counter's values by label values, e.g. ``{"document-created/filtered": 50000.0}``."""
    return {
        "/".join(sample.labels.values()): sample.value
        for metric in counter.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }


async def bench(bootstrap: str, *, records: int, partitions: int, rounds: int) -> None:
    suffix = uuid.uuid4().hex[:10]
    topics = Topics(
        documents=f"bench.document-created.{suffix}",
        manifests=f"bench.manifest-snapshot.{suffix}",
        state=f"bench.published-view.{suffix}",
        dead_letters=f"bench.dead-letter.{suffix}",
    )
    await create_topics(bootstrap, [topics.documents, topics.manifests], partitions=partitions)
    await create_topics(
        bootstrap, [topics.state], partitions=partitions, config=COMPACTED_TOPIC_CONFIG
    )
    await create_topics(bootstrap, [topics.dead_letters], partitions=1)
    bare: list[Measure] = []
    relay: list[Measure] = []
    floor: list[Measure] = []
    cpu_ratios: list[float] = []
    try:
        filling = time.perf_counter()
        encoded = _records(records)
        await _fill(bootstrap, topics.documents, encoded)
        print(
            f"filled {topics.documents} ({partitions} partitions) with {records:,} "
            f"document-created events in {time.perf_counter() - filling:.1f} s"
        )
        for _ in range(rounds):
            measure, bare_cpu = await read_bare(bootstrap, topics, records)
            bare.append(measure)
            show("(a) bare aiokafka getmany", bare[-1])
            measure, relay_cpu, metrics = await read_relay(bootstrap, topics, records)
            relay.append(measure)
            show("(b) relay Ingest + handle", measure)
            outcomes = ", ".join(
                f"{k}={v:,.0f}" for k, v in sorted(_totals(metrics.events).items())
            )
            calls = sum(_totals(metrics.partner_requests).values())
            print(f"      outcomes: {outcomes}; partner requests: {calls:,.0f}")
            floor.append(decode_and_plan(encoded))
            show("(c) decode + plan, no Kafka", floor[-1])
            # The machine may be shared: CPU time is what each side itself spent per record.
            cpu_ratios.append((bare_cpu / bare[-1].records) / (relay_cpu / relay[-1].records))
            print(
                f"    this round (b)/(a): {bare[-1].seconds / relay[-1].seconds:.2f} by wall time,"
                f" {cpu_ratios[-1]:.2f} by CPU time ({bare_cpu:.2f} s against {relay_cpu:.2f} s)"
            )
    finally:
        await delete_topics(bootstrap, list(vars(topics).values()))
    report(rounds=rounds, bare=bare, relay=relay, floor=floor, target=TARGET_RATIO)
    verdict = "met" if max(cpu_ratios) >= TARGET_RATIO else "NOT met"
    print(
        f"ratio (b)/(a) by CPU time, each round: {', '.join(f'{r:.2f}' for r in cpu_ratios)}"
        f" (target >= {TARGET_RATIO}: {verdict})"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_ingest", description=__doc__)
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternate (a) and (b); keep the best"
    )
    args = parser.parse_args(list(argv) if argv is not None else [])
    options = {"records": args.records, "partitions": args.partitions, "rounds": args.rounds}
    on_a_broker(functools.partial(bench, **options))


if __name__ == "__main__":
    main(sys.argv[1:])
