"""The relay's two long-lived Kafka clients, and how they stop within a bound."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from consumer.kafka.changelog import dead_letter_room
from consumer.kafka.connection import KafkaConnection
from consumer.settings import Settings

log = logging.getLogger("consumer.app.relay")  # the relay's log, as before the split


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
        # A replay of a dead letter is a transaction (consumer/ops/replay.py): one fenced by a
        # concurrent replay of the same record is aborted, and never read.
        isolation_level="read_committed",
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
