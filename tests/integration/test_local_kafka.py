"""The local Kafka broker behaves like the Kafka the relay runs against in production."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from consumer.local.kafka import LocalKafka, LocalKafkaError, free_port
from tests.fixtures.kafka import TopicFactory

pytestmark = pytest.mark.integration


async def read_all(bootstrap: str, topic: str) -> list[tuple[bytes | None, bytes | None]]:
    """Every record of partition 0 of ``topic`` still in the log, as (key, value), in order."""
    partition = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        end = (await consumer.end_offsets([partition]))[partition]
        records: list[tuple[bytes | None, bytes | None]] = []
        async with asyncio.timeout(30):
            while await consumer.position(partition) < end:
                batch = await consumer.getmany(partition, timeout_ms=1000)
                records.extend((r.key, r.value) for r in batch.get(partition, []))
        return records
    finally:
        await consumer.stop()


async def topic_config(bootstrap: str, topic: str) -> dict[str, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    return {
        entry[0]: entry[1]
        for response in responses
        for resource in response.resources
        for entry in resource[4]
    }


async def test_a_record_makes_the_round_trip(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topic = await topic_factory("round-trip", partitions=3)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        sent = await producer.send_and_wait(
            topic, b'{"hello": 1}', key=b"agency:building", headers=[("event-type", b"x")]
        )
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"{topic}-group",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        async with asyncio.timeout(30):
            record = await consumer.getone()
        await consumer.commit()
    finally:
        await consumer.stop()

    assert (record.partition, record.offset) == (sent.partition, sent.offset)
    assert record.key == b"agency:building"
    assert record.value == b'{"hello": 1}'
    assert list(record.headers) == [("event-type", b"x")]


async def test_a_compacted_topic_keeps_its_policy_and_is_compacted(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topic = await topic_factory(
        "changelog",
        config={
            "cleanup.policy": "compact",
            "segment.ms": "100",
            "min.cleanable.dirty.ratio": "0.01",
            "delete.retention.ms": "100",
        },
    )
    assert (await topic_config(kafka_bootstrap, topic))["cleanup.policy"] == "compact"

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for value in (b"v1", b"v2", b"v3"):
            await producer.send_and_wait(topic, value, key=b"doc")
        # Only closed segments are compacted: keep appending so that segments roll.
        deadline = time.monotonic() + 60
        while True:
            await producer.send_and_wait(topic, b"-", key=b"filler")
            doc_values = [v for k, v in await read_all(kafka_bootstrap, topic) if k == b"doc"]
            if doc_values == [b"v3"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    finally:
        await producer.stop()

    assert doc_values == [b"v3"]


def test_stopping_twice_is_harmless() -> None:
    kafka = LocalKafka()
    kafka.start()
    data_dir = kafka.data_dir
    assert kafka.running
    kafka.stop()
    kafka.stop()

    assert not kafka.running
    assert not data_dir.exists()
    with pytest.raises(LocalKafkaError, match="not started"):
        _ = kafka.bootstrap_servers


async def test_the_async_form_starts_and_stops() -> None:
    async with LocalKafka() as kafka:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
        await producer.start()
        await producer.stop()
        await asyncio.to_thread(kafka.stop)
    assert not kafka.running


def test_a_broker_with_a_bad_property_names_its_log(tmp_path: Path) -> None:
    kafka = LocalKafka(data_dir=tmp_path, extra_properties={"num.io.threads": "many"})

    with pytest.raises(LocalKafkaError, match=re.escape(str(tmp_path / "broker.log"))) as error:
        kafka.start()

    assert "num.io.threads" in str(error.value)
    assert not kafka.running
    kafka.stop()


def test_a_broker_whose_port_is_taken_names_its_log_and_the_cause(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        kafka = LocalKafka(
            data_dir=tmp_path, port=squatter.getsockname()[1], controller_port=free_port()
        )

        with pytest.raises(LocalKafkaError, match=re.escape(str(tmp_path / "broker.log"))) as error:
            kafka.start()

    assert "Address already in use" in str(error.value)
    assert not kafka.running
