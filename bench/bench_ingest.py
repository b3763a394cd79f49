"""Ingest with state: the relay's read path beside a bare consume-and-produce loop, by CPU time.

One topic of 6 partitions is filled with N document-created events (100,000 by default; a tenth
under ``BENCH_SCALE=0.1``, ``make bench QUICK=1``): 40 agencies of 125 buildings each, inline
PDFs of about 700 B, and every twentieth event (5 %) a re-publication of an earlier, unchanged
document with a later ``occurred_at``. Every document is for the council while routing forwards
the building's audience only, so each event leaves one state record (a ``filtered`` marker) and
nothing is sent to the partner. Both sides build their Kafka clients as the relay does
(``consumer.app.clients``), are assigned every partition by hand and commit every second:
(a) a bare aiokafka loop: ``getmany``, one small record produced per record to a compacted topic
    on the same partition, the fetch's sends gathered, the offsets committed every second;
(b) the relay's own ``Ingest`` loop and housekeeping, one ``PartitionProcessor`` and
    ``ChangelogWriter`` per partition (as ``Relay`` wires them): decode and validate in one pass
    (msgspec), plan, apply to the view, write the state record; an event counts once its offset
    is committable;
(c) ``decode_record`` and ``plan_document`` alone on the same events in memory: what (b) would
    cost with no Kafka, no task and no state write.
The whole process runs with the relay's garbage-collector policy (``consumer.app.heap``), as the
service does from its start: (a) and (b) alike.
Target: (b) handles at least 0.5 of the events per CPU second that (a) does. Each round runs (a),
(b) and (c) in turn and prints events per CPU second of each, and the ratio: the machine may be
shared, so CPU time (this process's own) compares where wall time does not.

Run with ``python -m bench.bench_ingest [--events N]``. The broker is the one named by
``CHOUETTE_RELAY_TEST_KAFKA``, or a local one started for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
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

from bench.common import SCALE_VARIABLE, delete_topics, on_a_broker, scale
from consumer.app.clients import _kafka_clients
from consumer.app.heap import tune_collector
from consumer.app.partition import partition_processor
from consumer.app.processor import DOCUMENTS, MANIFESTS, PartitionProcessor
from consumer.core.decoding import decode_record
from consumer.core.events import DocumentCreated
from consumer.core.guard import DeletionGuard
from consumer.core.planning.documents import plan_document
from consumer.core.routing import RoutingTable
from consumer.core.state import DocStatus
from consumer.core.view import PublishedView
from consumer.kafka.brokerwatch import BrokerWatch
from consumer.kafka.changelog import COMPACTED_TOPIC_CONFIG, ChangelogWriter
from consumer.kafka.connection import KafkaConnection
from consumer.kafka.deadletters import DeadLetterSink
from consumer.kafka.ingest import Ingest
from consumer.local.kafka import create_topics
from consumer.local.pdf import make_pdf
from consumer.metrics import RelayMetrics
from consumer.partner.client import ChouetteCoproClient
from consumer.partner.content import ContentFetcher
from consumer.partner.keys import ApiKeyStore
from consumer.partner.scheduler import Scheduler
from consumer.settings import KafkaSettings, Settings

TARGET_RATIO = 0.5
EVENTS = 100_000
PARTITIONS = 6
AGENCIES = 40
BUILDINGS_PER_AGENCY = 125
REPUBLISHED_EVERY = 20  # the 20th event of each run of 20 publishes the 1st again: 5 %
DISTINCT_PDFS = 64
HEADERS = [("event-type", b"document-created"), ("schema-version", b"1")]
# Never called: routing filters every document before any partner operation is planned.
UNREACHED_PARTNER = "http://127.0.0.1:9/api/v1"
ROUTING = RoutingTable.from_mapping(
    {
        "agencies": {
            f"agence-{a:02d}": {
                "modules": ["ag"],
                "audiences": ["building"],  # the events are for the council
                "first_publication": "history",
                "condominia": {
                    f"bat-{b}": str(10_000 * a + b) for b in range(BUILDINGS_PER_AGENCY)
                },
            }
            for a in range(AGENCIES)
        }
    }
)

Encoded = tuple[bytes, bytes]


@dataclass(frozen=True)
class Topics:
    documents: str
    manifests: str
    state: str
    bare_state: str
    dead_letters: str


@dataclass(frozen=True)
class Side:
    """What one side did in one round: events done, wall seconds, CPU seconds of this process."""

    events: int
    seconds: float
    cpu_seconds: float

    @property
    def per_cpu_second(self) -> float:
        return self.events / self.cpu_seconds

    def line(self, label: str) -> str:
        return (
            f"{label:<34}{self.events:>9,} events {self.seconds:6.2f} s wall "
            f"{self.cpu_seconds:6.2f} s CPU {self.per_cpu_second:>9,.0f} events/CPU s "
            f"({self.cpu_seconds / self.events * 1e6:5.1f} us an event)"
        )


def _settings(bootstrap: str, group_id: str) -> Settings:
    """The relay's defaults, as a deployment without overrides runs them, on ``bootstrap``."""
    return Settings(kafka=KafkaSettings(bootstrap_servers=bootstrap, group_id=group_id))


def _content(pdf: bytes) -> dict[str, Any]:
    return {
        "media_type": "application/pdf",
        "size_bytes": len(pdf),
        "sha256": hashlib.sha256(pdf).hexdigest(),
        "inline_base64": base64.b64encode(pdf).decode(),
    }


def _events(count: int) -> list[Encoded]:
    """Key and value of every event, as LSC publishes them."""
    contents = [_content(make_pdf(f"Convocation {n}")) for n in range(DISTINCT_PDFS)]
    start = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
    events: list[dict[str, Any]] = []
    for n in range(count):
        occurred_at = (start + dt.timedelta(milliseconds=n)).isoformat().replace("+00:00", "Z")
        if n % REPUBLISHED_EVERY == REPUBLISHED_EVERY - 1:
            # the same document, unchanged, published again later
            original = events[n - REPUBLISHED_EVERY + 1]
            event_id = str(uuid.UUID(int=n + 1))
            events.append({**original, "event_id": event_id, "occurred_at": occurred_at})
            continue
        building = n % (AGENCIES * BUILDINGS_PER_AGENCY)
        events.append(
            {
                "schema_version": 1,
                "event_type": "document-created",
                "event_id": str(uuid.UUID(int=n + 1)),
                "occurred_at": occurred_at,
                "agency_id": f"agence-{building // BUILDINGS_PER_AGENCY:02d}",
                "building_id": f"bat-{building % BUILDINGS_PER_AGENCY}",
                "document": {
                    "id": f"{uuid.UUID(int=n * 2_654_435_761 % 2**128)}:att-{n % 3}",
                    "module": "ag",
                    "category": "Assemblées générales",
                    "title": f"Convocation du conseil syndical {n}",
                    "document_date": "2025-05-01",
                    "audience": "council",
                    "content": contents[n % DISTINCT_PDFS],
                },
            }
        )
    return [(f"{e['agency_id']}:{e['building_id']}".encode(), orjson.dumps(e)) for e in events]


async def _fill(bootstrap: str, topic: str, records: list[Encoded]) -> None:
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


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    await consumer.topics()
    return [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]


async def _end_offsets(consumer: AIOKafkaConsumer, topic: str) -> int:
    """The sum of ``topic``'s end offsets: records written to it so far."""
    partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    return sum((await consumer.end_offsets(partitions)).values())


async def consume_and_produce(bootstrap: str, topics: Topics, events: int) -> Side:
    """(a) The bare loop: each record consumed, one small record produced to the compacted topic
    on its partition, the fetch's sends gathered, offsets committed every second."""
    settings = _settings(bootstrap, f"bench-bare-{uuid.uuid4().hex[:10]}")
    producer, consumer = _kafka_clients(settings, KafkaConnection(bootstrap_servers=bootstrap))
    interval = settings.kafka.commit_interval_s
    await producer.start()
    await consumer.start()
    try:
        consumer.assign(await _partitions(consumer, topics.documents))
        loop = asyncio.get_running_loop()
        done = 0
        offsets: dict[TopicPartition, int] = {}
        started, cpu = time.perf_counter(), time.process_time()
        committed_at = loop.time()
        while done < events:
            batches = await consumer.getmany(
                timeout_ms=200, max_records=settings.kafka.max_poll_records
            )
            sends = []
            for tp, records in batches.items():
                for record in records:
                    sends.append(
                        await producer.send(
                            topics.bare_state,
                            key=record.key,
                            value=record.offset.to_bytes(8, "big"),
                            partition=tp.partition,
                        )
                    )
                offsets[tp] = records[-1].offset + 1
            await asyncio.gather(*sends)
            done += len(sends)
            if loop.time() - committed_at >= interval:
                await consumer.commit(offsets)
                committed_at = loop.time()
        await consumer.commit(offsets)
        return Side(done, time.perf_counter() - started, time.process_time() - cpu)
    finally:
        await consumer.stop()
        await producer.stop()


async def ingest_with_state(
    bootstrap: str, topics: Topics, events: int
) -> tuple[Side, RelayMetrics, int]:
    """(b) The relay's ``Ingest`` and housekeeping feeding one ``PartitionProcessor`` per
    partition, each with its ``ChangelogWriter``; and the state records it wrote."""
    settings = _settings(bootstrap, f"bench-relay-{uuid.uuid4().hex[:10]}")
    metrics = RelayMetrics.create(CollectorRegistry(), version="bench")
    producer, consumer = _kafka_clients(settings, KafkaConnection(bootstrap_servers=bootstrap))
    watch = BrokerWatch(
        bootstrap_servers=bootstrap, unavailable_timeout_s=300.0, window_s=10.0, metrics=metrics
    )
    writers: list[ChangelogWriter] = []
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
        dead_letters = await stack.enter_async_context(
            DeadLetterSink(
                producer=producer,
                connection=KafkaConnection(bootstrap_servers=bootstrap),
                topic=topics.dead_letters,
                metrics=metrics,
                relay_version="bench",
                max_bytes=1_000_000,
                watch=watch,
            )
        )
        kinds = {DOCUMENTS: topics.documents, MANIFESTS: topics.manifests}

        async def build_processor(partition: int) -> PartitionProcessor:
            writer = ChangelogWriter(
                producer=producer, topic=topics.state, partition=partition, watch=watch
            )
            writers.append(writer)
            return partition_processor(
                partition,
                settings=settings,
                topics=kinds,
                routing=ROUTING,
                guard=DeletionGuard(max_share=0.2, min_count=10),
                view=PublishedView(),
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
            commit_interval_s=settings.kafka.commit_interval_s,
            max_records=settings.kafka.max_poll_records,
            watch=watch,
            probe=consumer.topics,
            on_unavailable=_raise,
        )
        await consumer.start()
        stack.push_async_callback(consumer.stop)
        written_before = await _end_offsets(consumer, topics.state)
        documents = await _partitions(consumer, topics.documents)
        consumer.assign(documents + await _partitions(consumer, topics.manifests))
        ingest.assign({tp.partition for tp in documents})  # started by the loop below

        def done() -> int:
            return sum(
                processor.committable().get(topics.documents, 0)
                for processor in ingest.processors.values()
            )

        started, cpu = time.perf_counter(), time.process_time()
        async with asyncio.TaskGroup() as tasks:
            running = tasks.create_task(ingest.run(), name="ingest")
            housekeeping = tasks.create_task(ingest.run_housekeeping(), name="housekeeping")
            while done() < events and not running.done() and not housekeeping.done():
                # Polled, not awaited: an event is finished when its offset becomes committable.
                await asyncio.wait({running, housekeeping}, timeout=0.01)
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
            ingest.stop()
        await ingest.commit()
        for processor in ingest.processors.values():
            await processor.close()
        for writer in writers:
            await writer.close()
        written = await _end_offsets(consumer, topics.state) - written_before
        return Side(done(), seconds, cpu_seconds), metrics, written


def _raise(error: BaseException) -> None:
    raise error


def decode_and_plan(records: list[Encoded]) -> Side:
    """(c) What (b) costs with no Kafka: ``decode_record`` and ``plan_document`` in a plain loop,
    each plan's records applied to one view."""
    view = PublishedView()
    max_value_bytes = KafkaSettings().max_value_bytes
    started, cpu = time.perf_counter(), time.process_time()
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
        for record in plan_document(view, ROUTING, event).records:
            view.apply(record)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    if view.count(DocStatus.FILTERED) == 0:
        raise RuntimeError("no event left a filtered marker: the routing of the bench is wrong")
    return Side(len(records), seconds, cpu_seconds)


def _totals(counter: Counter) -> dict[str, float]:
    """A counter's values by label values, e.g. ``{"document-created/filtered": 50000.0}``."""
    return {
        "/".join(sample.labels.values()): sample.value
        for metric in counter.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }


async def bench(bootstrap: str, *, events: int, rounds: int) -> None:
    tune_collector()
    suffix = uuid.uuid4().hex[:10]
    topics = Topics(
        documents=f"bench.document-created.{suffix}",
        manifests=f"bench.manifest-snapshot.{suffix}",
        state=f"bench.published-view.{suffix}",
        bare_state=f"bench.bare-state.{suffix}",
        dead_letters=f"bench.dead-letter.{suffix}",
    )
    await create_topics(bootstrap, [topics.documents, topics.manifests], partitions=PARTITIONS)
    await create_topics(
        bootstrap,
        [topics.state, topics.bare_state],
        partitions=PARTITIONS,
        config=COMPACTED_TOPIC_CONFIG,
    )
    await create_topics(bootstrap, [topics.dead_letters], partitions=1)
    ratios: list[float] = []
    try:
        filling = time.perf_counter()
        encoded = _events(events)
        await _fill(bootstrap, topics.documents, encoded)
        size = sum(len(value) for _, value in encoded) / len(encoded)
        print(
            f"filled {topics.documents} ({PARTITIONS} partitions) with {events:,} "
            f"document-created events of {size:,.0f} B on average, "
            f"{AGENCIES} agencies x {BUILDINGS_PER_AGENCY} buildings, "
            f"{1 / REPUBLISHED_EVERY:.0%} published again unchanged, "
            f"in {time.perf_counter() - filling:.1f} s",
            flush=True,
        )
        for number in range(1, rounds + 1):
            print(f"round {number}:")
            bare = await consume_and_produce(bootstrap, topics, events)
            print(bare.line("(a) bare consume + produce + commit"), flush=True)
            relay, metrics, written = await ingest_with_state(bootstrap, topics, events)
            print(relay.line("(b) relay Ingest + state"), flush=True)
            outcomes = ", ".join(
                f"{k}={v:,.0f}" for k, v in sorted(_totals(metrics.events).items())
            )
            calls = sum(_totals(metrics.partner_requests).values())
            print(
                f"      outcomes: {outcomes}; state records written: {written:,}; "
                f"partner requests: {calls:,.0f}"
            )
            floor = decode_and_plan(encoded)
            print(floor.line("(c) decode + plan, no Kafka"), flush=True)
            ratios.append(relay.per_cpu_second / bare.per_cpu_second)
            print(
                f"    this round (b)/(a): {ratios[-1]:.2f} by CPU time, "
                f"{bare.seconds / relay.seconds:.2f} by wall time; "
                f"(c)/(a) = {floor.per_cpu_second / bare.per_cpu_second:.2f} "
                "is the most (b) could reach without faster decoding or planning",
                flush=True,
            )
    finally:
        await delete_topics(bootstrap, list(vars(topics).values()))
    verdict = "met" if max(ratios) >= TARGET_RATIO else "NOT met"
    print(
        f"ratio (b)/(a) by CPU time, each round: {', '.join(f'{r:.2f}' for r in ratios)}"
        f" (target >= {TARGET_RATIO}: {verdict})"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_ingest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    share = scale()
    parser.add_argument(
        "--events",
        type=int,
        default=max(REPUBLISHED_EVERY, int(EVENTS * share)),
        help=f"document-created events (default {EVENTS:,}, times ${SCALE_VARIABLE} when set)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="(a), (b) and (c) in turn")
    args = parser.parse_args(list(argv) if argv is not None else [])
    on_a_broker(functools.partial(bench, events=args.events, rounds=args.rounds))


if __name__ == "__main__":
    main(sys.argv[1:])
