"""Where input goes when it cannot be forwarded: the dead-letter topic, once per source record.

The sink wraps a ``SourceRecord`` (bytes untouched) in the dead-letter envelope, so the topic
carries exactly what LSC sent (key, value, headers) with its topic, partition and offset. An input
offset is committed only after its dead letter is written, so a relay that stops in between reads
the record again: before writing, the sink reads what the dead-letter topic holds since the record
was published, and writes nothing when a dead letter for the same topic, partition and offset is
there already.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
from collections.abc import Awaitable
from types import TracebackType

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from consumer.core.deadletter import (
    DeadLetterLedger,
    SourceId,
    build_dead_letter,
    dead_letter_source,
)
from consumer.core.records import SourceRecord
from consumer.errors import KafkaConnectError
from consumer.kafka.brokerwatch import BrokerWatch
from consumer.kafka.connection import KafkaConnection
from consumer.kafka.startup import start_client
from consumer.metrics import RelayMetrics

log = logging.getLogger(__name__)

# How far before a record's own timestamp its dead letter may be dated: the clocks of LSC's
# producer and of the relay disagree by less than this.
CLOCK_MARGIN_MS = 3_600_000
# How long the look into the dead-letter topic may take before the dead letter is written anyway
# (a second copy is better than a record held back).
LOOKUP_TIMEOUT_S = 30.0


class DeadLetterSink:
    """Sends a source record with a machine-readable reason to the dead-letter topic, once.

    An async context manager: the reader of the dead-letter topic is started at the first dead
    letter and stopped on exit.
    """

    def __init__(
        self,
        *,
        producer: AIOKafkaProducer,
        connection: KafkaConnection,
        topic: str,
        metrics: RelayMetrics,
        relay_version: str,
        max_bytes: int,
        watch: BrokerWatch,
    ) -> None:
        self._watch = watch
        self._producer = producer
        self._connection = connection
        self._topic = topic
        self._metrics = metrics
        self._version = relay_version
        self._max_bytes = max_bytes
        self._ledger = DeadLetterLedger()
        self._reader: AIOKafkaConsumer | None = None
        self._closed = False
        # One look-and-write at a time: two records' looks must not read the same stretch.
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> DeadLetterSink:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the reader; later dead letters are written without a look. Harmless twice."""
        self._closed = True
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.stop()

    async def send(self, source: SourceRecord, *, reason: str, detail: str) -> None:
        """Write ``source``'s dead letter, unless the topic holds one for it already."""
        async with self._lock:
            written = (source.topic, source.partition, source.offset)
            if source.offset >= 0 and await self._written_already(source, written):
                log.info(
                    "input record dead-lettered already; not written again",
                    extra={
                        "reason": reason,
                        "topic": source.topic,
                        "partition": source.partition,
                        "offset": source.offset,
                    },
                )
                return
            await self._write(source, reason=reason, detail=detail)
            self._ledger.note(written)

    async def _written_already(self, source: SourceRecord, written: SourceId) -> bool:
        """Whether the dead-letter topic holds a dead letter for ``source``, read since the
        record was published (less the clock margin); False when the topic cannot be read."""
        if self._closed:
            return False
        stamp = source.timestamp_ms
        since = None if stamp is None or stamp < 0 else stamp - CLOCK_MARGIN_MS
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                await self._read_since(since)
        except (KafkaError, KafkaConnectError, TimeoutError) as exc:
            # Whatever stops the look, the dead letter is written (the write waits out an outage).
            log.warning(
                "dead-letter topic not read; the dead letter may be written twice",
                extra={"topic": self._topic, "error": repr(exc)},
            )
            return False
        return written in self._ledger

    async def _read_since(self, since_ms: int | None) -> None:
        """Read the stretches of the dead-letter topic the ledger lacks to reach back to
        ``since_ms`` (None: its beginning), up to its current end."""
        self._ledger.trim()
        reader = await self._started_reader()
        tps = [
            TopicPartition(self._topic, p) for p in reader.partitions_for_topic(self._topic) or ()
        ]
        if not tps:
            return
        ends = {tp.partition: offset for tp, offset in (await reader.end_offsets(tps)).items()}
        starts: dict[int, int] | None = None
        if not self._ledger.reaches_back_to(since_ms):
            if since_ms is None:
                found = await reader.beginning_offsets(tps)
                starts = {tp.partition: offset for tp, offset in found.items()}
            else:
                stamped = await reader.offsets_for_times(dict.fromkeys(tps, since_ms))
                starts = {
                    tp.partition: ends[tp.partition] if at is None else at.offset
                    for tp, at in stamped.items()
                }
        for partition, first, end in self._ledger.unread(starts, ends):
            sources = await self._read_stretch(reader, partition, first, end) if first < end else []
            self._ledger.mark_read(partition, first, end, sources)
        if starts is not None:
            self._ledger.reached_back_to(since_ms)

    async def _read_stretch(
        self, reader: AIOKafkaConsumer, partition: int, first: int, end: int
    ) -> list[SourceId]:
        tp = TopicPartition(self._topic, partition)
        reader.assign([tp])
        reader.seek(tp, first)
        sources: list[SourceId] = []
        while await reader.position(tp) < end:
            batches = await reader.getmany(tp, timeout_ms=500, max_records=1000)
            for record in batches.get(tp, ()):
                if record.offset < end and (found := dead_letter_source(record.value)):
                    sources.append(found)
        reader.pause(tp)  # no fetching in the background until the next look
        return sources

    async def _started_reader(self) -> AIOKafkaConsumer:
        if self._reader is None:
            reader = AIOKafkaConsumer(
                **self._connection.options(),
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
            await start_client(reader, self._connection)
            self._reader = reader
            await reader.topics()
        return self._reader

    async def _write(self, source: SourceRecord, *, reason: str, detail: str) -> None:
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
        agency = (source.key or b"").decode("utf-8", "replace").split(":", 1)[0]
        self._metrics.dead_letters.labels(self._metrics.agency_label(agency), reason).inc()
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
