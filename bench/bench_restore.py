"""Restore throughput: rebuilding the published view from the changelog beside a bare read of it.

One compacted topic partition is filled with N state records (200,000 by default: published
documents of a few hundred buildings and their building records, encoded with ``encode_state``,
so documents in the compact form of state record v2),
then read with the fetch settings the relay's restore uses (4 MiB per partition fetch,
``getmany`` of up to 10,000 records), each run including the reader's start and stop:
(a) a bare aiokafka consumer that only counts records;
(b) ``consumer.kafka.changelog.restore_partition`` into an empty ``PublishedView`` (check every
    record, apply it);
(c) ``PublishedView.restore`` of the same records from memory, no Kafka: the most (b) could reach.
The process runs with the relay's garbage-collector policy (``consumer.app.heap``), as the service
does: (a) and (b) alike.
Target: (b) restores at least 0.7 times as many records per second as (a) reads, judged by CPU
time (the best round's).

Each round also prints the ratio of the two in that round, by wall time and by the CPU time of
this process (the broker's is the same for both): on a machine shared with other work, wall times
swing with the load while CPU times stay put, and the ratio within a round is what compares.

Run with ``python -m bench.bench_restore [--records N]`` (``BENCH_SCALE=0.1``: a tenth). The
broker is the one named by ``CHOUETTE_RELAY_TEST_KAFKA``, or a local one started for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import hashlib
import sys
import time
import uuid
from collections.abc import Sequence
from typing import NamedTuple

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.common import SCALE_VARIABLE, Measure, delete_topics, on_a_broker, report, scale, show
from consumer.app.heap import tune_collector
from consumer.core.events import Module
from consumer.core.state import BuildingRecord, DocKey, DocStatus, DocumentRecord, StateRecord
from consumer.core.state_codec import encode_state
from consumer.core.view import PublishedView
from consumer.kafka.changelog import COMPACTED_TOPIC_CONFIG, restore_partition
from consumer.kafka.connection import KafkaConnection
from consumer.local.kafka import create_topics

TARGET_RATIO = 0.7
RECORDS = 200_000
AGENCY = "agence-bench"
DOCUMENTS_PER_BUILDING = 400
FETCH_BYTES = 4 * 1024 * 1024  # what restore_partition asks for
BATCH_RECORDS = 10_000
SEEN_AT = dt.datetime(2024, 6, 1, 12, 0, tzinfo=dt.UTC)
MODULES = list(Module)

Encoded = tuple[bytes, bytes | None]


class Read(NamedTuple):
    """A record as a consumer hands it out, for (c)."""

    key: bytes
    value: bytes | None


def _records(count: int) -> list[Encoded]:
    """``count`` changelog records: every building's documents, then its building record."""
    encoded: list[Encoded] = []
    building = 0
    while len(encoded) < count:
        building_id = f"bat-{building}"
        per_building = min(DOCUMENTS_PER_BUILDING, count - len(encoded) - 1)
        for n in range(per_building):
            encoded.append(encode_state(_document(building_id, n)))
        record: StateRecord = BuildingRecord(
            AGENCY, building_id, dict.fromkeys(MODULES[:3], SEEN_AT), True
        )
        encoded.append(encode_state(record))
        building += 1
    return encoded


def _document(building_id: str, n: int) -> DocumentRecord:
    return DocumentRecord(
        key=DocKey(AGENCY, building_id, f"{uuid.UUID(int=n * 2_654_435_761)}:att-{n % 3}"),
        status=DocStatus.PUBLISHED,
        sha256=hashlib.sha256(f"{building_id}/{n}".encode()).hexdigest(),
        module=MODULES[n % len(MODULES)],
        seen_at=SEEN_AT - dt.timedelta(minutes=n),
        document_date=dt.date(2020, 1, 1) + dt.timedelta(days=n % 1500),
        size_bytes=50_000 + n,
        remote_id=str(1_000_000 + n),
        condominium_id=f"c-{building_id}",
    )


async def _fill(bootstrap: str, topic: str, encoded: list[Encoded]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1_048_576
    )
    await producer.start()
    try:
        pending: list[asyncio.Future[object]] = []
        for key, value in encoded:
            pending.append(await producer.send(topic, value=value, key=key, partition=0))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def read_bare(bootstrap: str, topic: str) -> Measure:
    """(a) Count every record of the partition with the restore's fetch settings."""
    started = time.perf_counter()
    tp = TopicPartition(topic, 0)
    reader = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=FETCH_BYTES,
    )
    await reader.start()
    try:
        reader.assign([tp])
        end = (await reader.end_offsets([tp]))[tp]
        await reader.seek_to_beginning(tp)
        count = 0
        while await reader.position(tp) < end:
            batches = await reader.getmany(tp, timeout_ms=1000, max_records=BATCH_RECORDS)
            count += sum(1 for record in batches.get(tp, []) if record.offset < end)
    finally:
        await reader.stop()
    return Measure(count, time.perf_counter() - started)


async def read_restore(bootstrap: str, topic: str, expected_documents: int) -> Measure:
    """(b) The relay's restore of the partition into an empty view."""
    started = time.perf_counter()
    view = PublishedView()
    applied, _ = await restore_partition(
        connection=KafkaConnection(bootstrap_servers=bootstrap), topic=topic, partition=0, view=view
    )
    seconds = time.perf_counter() - started
    if view.count(DocStatus.PUBLISHED) != expected_documents:
        raise RuntimeError(
            f"restored {view.count(DocStatus.PUBLISHED)} documents, expected {expected_documents}"
        )
    return Measure(applied, seconds)


def decode_and_apply(encoded: list[Encoded]) -> Measure:
    """(c) The restore's own work on records already in memory."""
    records = [Read(key, value) for key, value in encoded]
    started = time.perf_counter()
    applied = PublishedView().restore(records)
    return Measure(applied, time.perf_counter() - started)


async def bench(bootstrap: str, *, records: int, rounds: int) -> None:
    tune_collector()  # as the relay runs from its start: both sides alike
    topic = f"bench.published-view.{uuid.uuid4().hex[:10]}"
    await create_topics(bootstrap, [topic], partitions=1, config=COMPACTED_TOPIC_CONFIG)
    bare: list[Measure] = []
    restore: list[Measure] = []
    floor: list[Measure] = []
    cpu_ratios: list[float] = []
    try:
        filling = time.perf_counter()
        encoded = _records(records)
        documents = sum(1 for key, _ in encoded if key.count(b":") >= 2)
        size = sum(len(key) + len(value or b"") for key, value in encoded)
        await _fill(bootstrap, topic, encoded)
        print(
            f"filled {topic} with {records:,} state records ({documents:,} documents, "
            f"{size / 1_048_576:.0f} MiB) in {time.perf_counter() - filling:.1f} s"
        )
        for _ in range(rounds):
            cpu = time.process_time()
            bare.append(await read_bare(bootstrap, topic))
            bare_cpu = time.process_time() - cpu
            show("(a) bare aiokafka getmany", bare[-1])
            cpu = time.process_time()
            restore.append(await read_restore(bootstrap, topic, documents))
            restore_cpu = time.process_time() - cpu
            show("(b) restore_partition", restore[-1])
            floor.append(decode_and_apply(encoded))
            show("(c) decode + apply, no Kafka", floor[-1])
            wall_ratio = bare[-1].seconds / restore[-1].seconds
            cpu_ratios.append(bare_cpu / restore_cpu)
            print(
                f"    this round (b)/(a): {wall_ratio:.2f} by wall time, "
                f"{cpu_ratios[-1]:.2f} by CPU time ({bare_cpu:.2f} s against {restore_cpu:.2f} s)"
            )
    finally:
        await delete_topics(bootstrap, [topic])
    report(rounds=rounds, bare=bare, relay=restore, floor=floor, target=TARGET_RATIO)
    verdict = "met" if max(cpu_ratios) >= TARGET_RATIO else "NOT met"
    print(
        f"ratio (b)/(a) by CPU time, each round: {', '.join(f'{r:.2f}' for r in cpu_ratios)}"
        f" (target >= {TARGET_RATIO}: {verdict})"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_restore", description=__doc__)
    parser.add_argument(
        "--records",
        type=int,
        default=max(1_000, int(RECORDS * scale())),
        help=f"state records (default {RECORDS:,}, times ${SCALE_VARIABLE} when set)",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternate (a), (b) and (c); keep the best"
    )
    args = parser.parse_args(list(argv) if argv is not None else [])
    options = {"records": args.records, "rounds": args.rounds}
    on_a_broker(functools.partial(bench, **options))


if __name__ == "__main__":
    main(sys.argv[1:])
