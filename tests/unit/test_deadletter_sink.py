"""A dead letter is never held back by the look for an earlier copy: when the dead-letter topic
cannot be read, the dead letter is written anyway (and counted)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import orjson
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from consumer.core.records import SourceRecord
from consumer.kafka.brokerwatch import BrokerWatch
from consumer.kafka.connection import KafkaConnection
from consumer.kafka.deadletters import DeadLetterSink
from consumer.local.kafka import free_port
from consumer.metrics import UNKNOWN_AGENCY, RelayMetrics


class Producer:
    """The producer's ``send``, acknowledged at once."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, topic: str, **record: Any) -> asyncio.Future[None]:
        self.sent.append({"topic": topic, **record})
        acknowledged: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        acknowledged.set_result(None)
        return acknowledged


async def test_a_dead_letter_is_written_when_the_topic_cannot_be_read() -> None:
    registry = CollectorRegistry()
    metrics = RelayMetrics.create(registry, version="test", agencies=["a"])
    nobody = f"127.0.0.1:{free_port()}"
    producer = Producer()
    async with DeadLetterSink(
        producer=cast(AIOKafkaProducer, producer),
        connection=KafkaConnection(bootstrap_servers=nobody, connect_timeout_s=1.0),
        topic="chouette-relay.dead-letter.v1",
        metrics=metrics,
        relay_version="test",
        max_bytes=1_000_000,
        watch=BrokerWatch(
            bootstrap_servers=nobody, unavailable_timeout_s=30.0, window_s=10.0, metrics=metrics
        ),
    ) as sink:
        source = SourceRecord(
            "lsc.document-created.v1", 2, 41, 1_714_986_902_000, b"a:b", b"{not json", ()
        )
        await sink.send(source, reason="not_json", detail="not JSON")
        stranger = source._replace(offset=42, key=b"nobody-knows:b")
        await sink.send(stranger, reason="not_json", detail="not JSON")

    sent, _ = producer.sent
    assert orjson.loads(sent["value"])["source"] == {
        "topic": "lsc.document-created.v1",
        "partition": 2,
        "offset": 41,
        "timestamp_ms": 1_714_986_902_000,
    }

    def counted(agency: str) -> float | None:
        labels = {"agency": agency, "reason": "not_json"}
        return registry.get_sample_value("chouette_relay_dead_letters_total", labels)

    # Under the agency of its key, or under one fixed value when the routing has no such agency.
    assert (counted("a"), counted(UNKNOWN_AGENCY)) == (1, 1)
