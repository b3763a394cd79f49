"""Where input goes when it cannot be forwarded: the dead-letter topic.

The sink wraps a ``SourceRecord`` (bytes untouched) in the dead-letter envelope, so the topic
carries exactly what LSC sent (key, value, headers) with its topic, partition and offset.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Awaitable

from aiokafka import AIOKafkaProducer

from consumer.core.deadletter import build_dead_letter
from consumer.core.records import SourceRecord
from consumer.kafka.brokerwatch import BrokerWatch
from consumer.metrics import RelayMetrics

log = logging.getLogger(__name__)


class DeadLetterSink:
    """Sends a source record with a machine-readable reason to the dead-letter topic."""

    def __init__(
        self,
        *,
        producer: AIOKafkaProducer,
        topic: str,
        metrics: RelayMetrics,
        relay_version: str,
        max_bytes: int,
        watch: BrokerWatch,
    ) -> None:
        self._watch = watch
        self._producer = producer
        self._topic = topic
        self._metrics = metrics
        self._version = relay_version
        self._max_bytes = max_bytes

    async def send(self, source: SourceRecord, *, reason: str, detail: str) -> None:
        key, value, headers = self._envelope(source, source.value, reason, detail)
        if len(value) > self._max_bytes and source.value is not None:
            # Too large to carry even in the dead-letter topic: say where the original stays.
            digest = hashlib.sha256(source.value).hexdigest()
            detail = (
                f"{detail} [value of {len(source.value)} bytes left out of this envelope "
                f"(sha256 {digest}); the original stays in {source.topic} partition "
                f"{source.partition} at offset {source.offset}]"
            )
            key, value, headers = self._envelope(source, None, reason, detail)

        async def send() -> Awaitable[object]:
            delivery: Awaitable[object] = await self._producer.send(
                self._topic, value=value, key=key, headers=headers
            )
            return delivery

        # A broker away for a while delays the dead letter (sent again, bounded) instead of
        # failing the record; the input offset stays open until it is acknowledged.
        await self._watch.deliver(
            send,
            what=f"a dead letter for dead-letter topic {self._topic!r}",
            operation="dead_letter",
        )
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

    def _envelope(
        self, source: SourceRecord, value: bytes | None, reason: str, detail: str
    ) -> tuple[bytes | None, bytes, list[tuple[str, bytes | None]]]:
        return build_dead_letter(
            source_topic=source.topic,
            partition=source.partition,
            offset=source.offset,
            timestamp_ms=source.timestamp_ms,
            key=source.key,
            value=value,
            headers=list(source.headers),
            reason=reason,
            detail=detail,
            failed_at=dt.datetime.now(dt.UTC),
            relay_version=self._version,
        )
