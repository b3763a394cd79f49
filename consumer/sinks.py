"""Where input goes when it cannot be forwarded: the dead-letter topic.

``SourceRecord`` is an input record as read, bytes untouched, so that the dead-letter envelope can
carry exactly what LSC sent (key, value, headers) with its topic, partition and offset.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer

from consumer.deadletter import build_dead_letter
from consumer.metrics import RelayMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SourceRecord:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


class DeadLetterSink:
    """Sends a source record with a machine-readable reason to the dead-letter topic."""

    def __init__(
        self, *, producer: AIOKafkaProducer, topic: str, metrics: RelayMetrics, relay_version: str
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._metrics = metrics
        self._version = relay_version

    async def send(self, source: SourceRecord, *, reason: str, detail: str) -> None:
        key, value, headers = build_dead_letter(
            source_topic=source.topic,
            partition=source.partition,
            offset=source.offset,
            timestamp_ms=source.timestamp_ms,
            key=source.key,
            value=source.value,
            headers=list(source.headers),
            reason=reason,
            detail=detail,
            failed_at=dt.datetime.now(dt.UTC),
            relay_version=self._version,
        )
        delivery = await self._producer.send(self._topic, value=value, key=key, headers=headers)
        await delivery
        self._metrics.dead_letters.labels(reason).inc()
        log.warning(
            "dead-lettered input record",
            extra={
                "reason": reason,
                "detail": detail,
                "topic": source.topic,
                "partition": source.partition,
                "offset": source.offset,
            },
        )
