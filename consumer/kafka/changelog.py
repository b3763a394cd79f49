"""The published view's changelog: a compacted Kafka topic, written and restored per partition.

State records go to the same partition number as the input partition they belong to, so that a
relay that owns input partition ``p`` restores exactly changelog partition ``p``. This module also
checks the topic layout at start-up: the relay refuses to run when partition counts differ.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import operator
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.producer.message_accumulator import BatchBuilder

from consumer.core.state import StateDecodeError, StateRecord
from consumer.core.state_codec import encode_state
from consumer.core.view import PublishedView
from consumer.errors import ConfigError
from consumer.kafka.brokerwatch import BrokerWatch
from consumer.kafka.connection import KafkaConnection
from consumer.kafka.startup import start_client

log = logging.getLogger(__name__)

# State records of one partition waiting to be written at most (about 300 B each, with their
# futures), and how many are sent and acknowledged together.
MAX_STATE_WRITES_QUEUED = 2_000
STATE_WRITE_CHUNK = 500

COMPACTED_TOPIC_CONFIG = {
    "cleanup.policy": "compact",
    "min.compaction.lag.ms": "60000",
    "segment.ms": "3600000",
}
# The commands topic is also the history of operator actions (commands and their outcomes, a
# few hundred bytes each): kept long enough for an audit trail.
COMMANDS_RETENTION_MS = 90 * 24 * 3600 * 1000
COMMANDS_TOPIC_CONFIG = {"retention.ms": str(COMMANDS_RETENTION_MS)}


def dead_letter_room(max_value_bytes: int) -> int:
    """Bytes a dead letter may take: the original value in base64 (4/3) plus its envelope."""
    return max_value_bytes * 2 + 65_536


@dataclass(frozen=True, slots=True)
class TopicLayout:
    input_partitions: int
    state_partitions: int


async def check_topics(
    *,
    connection: KafkaConnection,
    documents_topic: str,
    manifests_topic: str,
    state_topic: str,
    dead_letter_topic: str,
    commands_topic: str,
    create_missing_state: bool,
    max_value_bytes: int = 1_048_576,
    replication_factor: int = 1,
) -> TopicLayout:
    """Verify the input topics agree with each other and with the state topic.

    The state topic is created (compacted, same partition count) when missing and allowed; any
    mismatch stops start-up with a message naming the topics and their counts.
    """
    admin = AIOKafkaAdminClient(**connection.options())
    await start_client(admin, connection)
    try:
        counts = await _partition_counts(
            admin, [documents_topic, manifests_topic, state_topic, commands_topic]
        )
        docs, manifests = counts.get(documents_topic), counts.get(manifests_topic)
        for topic, count in ((documents_topic, docs), (manifests_topic, manifests)):
            if count is None:
                raise ConfigError(
                    f"input topic {topic!r} does not exist on {connection.bootstrap_servers}"
                )
        if docs is None or manifests is None:
            raise ConfigError("input topics are missing")
        if docs != manifests:
            raise ConfigError(
                f"input topics differ in partition count: {documents_topic!r} has {docs}, "
                f"{manifests_topic!r} has {manifests}; one building must map to one partition "
                "number in both"
            )
        created: list[str] = []
        state = counts.get(state_topic)
        if state is None:
            if not create_missing_state:
                raise ConfigError(f"state topic {state_topic!r} does not exist")
            await _create(admin, state_topic, docs, replication_factor, COMPACTED_TOPIC_CONFIG)
            created.append(state_topic)
            log.info("created state topic", extra={"topic": state_topic, "partitions": docs})
            state = docs
        if state != docs:
            raise ConfigError(
                f"state topic {state_topic!r} has {state} partitions but the input topics have "
                f"{docs}; recreate it with {docs} partitions (cleanup.policy=compact)"
            )
        commands = counts.get(commands_topic)
        if commands is None:
            await _create(admin, commands_topic, docs, replication_factor, COMMANDS_TOPIC_CONFIG)
            created.append(commands_topic)
        elif commands != docs:
            raise ConfigError(
                f"commands topic {commands_topic!r} has {commands} partitions but the input "
                f"topics have {docs}; recreate it with {docs} partitions"
            )
        if (await _partition_counts(admin, [dead_letter_topic])).get(dead_letter_topic) is None:
            # A dead letter carries the original value in base64: about 4/3 of its size.
            room = {"max.message.bytes": str(dead_letter_room(max_value_bytes))}
            await _create(admin, dead_letter_topic, 1, replication_factor, room)
            created.append(dead_letter_topic)
        if created:
            await _until_visible(admin, created)
        return TopicLayout(input_partitions=docs, state_partitions=state)
    finally:
        await admin.close()


async def topic_partitions(connection: KafkaConnection, topic: str) -> int | None:
    """How many partitions ``topic`` has, or None when it does not exist."""
    admin = AIOKafkaAdminClient(**connection.options())
    await start_client(admin, connection)
    try:
        return (await _partition_counts(admin, [topic])).get(topic)
    finally:
        await admin.close()


async def _partition_counts(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int | None]:
    described = await admin.describe_topics(topics)
    counts: dict[str, int | None] = {}
    for entry in described:
        name = entry["topic"]
        ok = entry.get("error_code", 0) == 0
        counts[name] = len(entry["partitions"]) if ok else None
    return counts


async def _until_visible(
    admin: AIOKafkaAdminClient, topics: list[str], timeout_s: float = 30.0
) -> None:
    """Wait until the broker's metadata lists ``topics`` with a leader for every partition.

    A topic just created is known to the controller before the brokers' metadata caches: a
    consumer subscribing at once would log "not found in cluster metadata" and rebalance again.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        described = await admin.describe_topics(topics)
        if all(
            entry.get("error_code", 0) == 0
            and entry["partitions"]
            and all(p["leader"] >= 0 for p in entry["partitions"])
            for entry in described
        ):
            return
        await asyncio.sleep(0.1)
    log.warning("created topics not yet visible; continuing", extra={"topics": topics})


async def _create(
    admin: AIOKafkaAdminClient, name: str, partitions: int, replication: int, config: dict[str, str]
) -> None:
    with contextlib.suppress(TopicAlreadyExistsError):
        await admin.create_topics(
            [
                NewTopic(
                    name,
                    num_partitions=partitions,
                    replication_factor=replication,
                    topic_configs=config,
                )
            ]
        )


class ChangelogWriter:
    """Writes the state records of one partition number, a batch at a time, in order.

    ``submit`` queues a record and returns a future that ends when the broker acknowledged it;
    one flusher sends what is queued, up to ``chunk`` records at once, and awaits their
    acknowledgements together: no task, timer or retry loop per record. At most ``max_queued``
    records wait; ``write`` waits for room beyond that (back-pressure), so a plan of any size
    never fills the producer's buffer until its sends time out. A broker away for a while
    delays the records (sent again one by one, bounded by ``watch``) rather than failing them;
    an outage beyond the bound fails every waiting record with ``KafkaUnavailableError``, and
    the next ``submit`` raises it too (the flusher's failure surfaces at the next call).
    """

    def __init__(
        self,
        *,
        producer: AIOKafkaProducer,
        topic: str,
        partition: int,
        watch: BrokerWatch,
        max_queued: int = MAX_STATE_WRITES_QUEUED,
        chunk: int = STATE_WRITE_CHUNK,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._partition = partition
        self._watch = watch
        self._max_queued = max_queued
        self._chunk = chunk
        self._queue: collections.deque[_Queued] = collections.deque()
        self._room = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None
        self._what = f"a state record for state topic {topic!r} partition {partition}"

    @property
    def queued(self) -> int:
        """Records submitted and not yet acknowledged (or sent)."""
        return len(self._queue)

    def submit(self, record: StateRecord) -> asyncio.Future[None]:
        """Queue ``record``; the future ends once the broker acknowledged it."""
        if self._failed is not None:
            raise self._failed
        key, value = encode_state(record)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Queued(key, value, done))
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush(), name=f"state-writer-{self._partition}"
            )
        return done

    async def write(self, record: StateRecord) -> None:
        """Write ``record`` and wait for its acknowledgement, after room if the queue is full."""
        await self.room()
        await self.submit(record)

    async def room(self) -> None:
        """Wait until fewer than ``max_queued`` records wait."""
        while len(self._queue) >= self._max_queued:
            self._room.clear()
            await self._room.wait()

    async def close(self) -> None:
        """Stop the flusher; records not acknowledged yet are left to the partition's next
        owner, which reads their input again."""
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)

    async def _flush(self) -> None:
        try:
            while self._queue:
                chunk = [self._queue[i] for i in range(min(self._chunk, len(self._queue)))]
                await self._send(chunk)
                for _ in chunk:
                    self._queue.popleft()
                for entry in chunk:
                    if not entry.done.done():
                        entry.done.set_result(None)
                if len(self._queue) < self._max_queued:
                    self._room.set()
        except Exception as error:  # noqa: BLE001 - every waiting record learns it, and the next
            self._failed = error  # submit raises it: the relay's failure path decides
            for entry in self._queue:
                _fail(entry, error)
            self._queue.clear()
        finally:
            self._flusher = None
            self._room.set()

    async def _send(self, chunk: list[_Queued]) -> None:
        """Send ``chunk`` as a few record batches (as many as the producer's batch size needs)
        and await their acknowledgements together; what failed is sent again one record at a
        time and in order, as ``BrokerWatch.deliver`` does, so that a record's own refusal (too
        large) fails that record only."""
        sent: list[tuple[asyncio.Future[object], list[_Queued]]] = []
        members: list[_Queued] = []
        batch = self._producer.create_batch()
        try:
            for entry in chunk:
                if batch.append(key=entry.key, value=entry.value, timestamp=None) is None:
                    sent.append((await self._send_batch(batch), members))
                    batch, members = self._producer.create_batch(), []
                    batch.append(key=entry.key, value=entry.value, timestamp=None)
                members.append(entry)
            if members:
                sent.append((await self._send_batch(batch), members))
        except KafkaError:
            # The producer's buffer stayed full, the broker is away, or the producer refused a
            # batch: the rest go one by one, where a record's own refusal is its own.
            pass
        if sent:
            # Not cancelled on timeout: aiokafka may still deliver them.
            await asyncio.wait(
                [delivery for delivery, _ in sent], timeout=self._watch.unavailable_timeout_s
            )
        acknowledged = {
            id(entry)
            for delivery, batch_members in sent
            if delivery.done() and not delivery.cancelled() and delivery.exception() is None
            for entry in batch_members
        }
        again = False
        for entry in chunk:
            if entry.done.done() or (not again and id(entry) in acknowledged):
                continue
            # Unacknowledged, or its batch failed: from here on, one by one, in order.
            again = True
            await self._deliver_one(entry)
        self._watch.touch()

    async def _send_batch(self, batch: BatchBuilder) -> asyncio.Future[object]:
        delivery: asyncio.Future[object] = await self._producer.send_batch(
            batch, self._topic, partition=self._partition
        )
        return delivery

    async def _deliver_one(self, entry: _Queued) -> None:
        async def send() -> Awaitable[object]:
            delivery: Awaitable[object] = await self._producer.send(
                self._topic, value=entry.value, key=entry.key, partition=self._partition
            )
            return delivery

        try:
            await self._watch.deliver(send, what=self._what, operation="changelog")
        except KafkaError as error:
            _fail(entry, error)


class _Queued(NamedTuple):
    key: bytes
    value: bytes | None
    done: asyncio.Future[None]


def _fail(entry: _Queued, error: BaseException) -> None:
    """Fail one record's future, unless its waiter gave up on it (a partition closed)."""
    if not entry.done.done():
        entry.done.set_exception(error)


_TIMESTAMP = operator.attrgetter("timestamp")  # a fetched record's, read in C over a batch

# A partition whose first records are all unreadable is not this relay's state (the wrong topic,
# or records of a newer relay): restoring it would forget everything, so start-up stops instead.
UNREADABLE_AT_START = 20


@dataclass(frozen=True, slots=True)
class UnreadableRecord:
    """A state record restore skipped: where it is, its key as read, and why."""

    topic: str
    partition: int
    offset: int
    key: str
    reason: str


class Restored(NamedTuple):
    """What ``restore_partition`` applied, and the newest record's time (seconds since the
    epoch, 0.0 for an empty partition): no upload intent in the view is younger."""

    applied: int
    newest_s: float


async def restore_partition(
    *,
    connection: KafkaConnection,
    topic: str,
    partition: int,
    view: PublishedView,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
    on_unreadable: Callable[[UnreadableRecord], None] = lambda record: None,
) -> Restored:
    """Apply every record of one changelog partition to ``view``, up to the end seen at start.

    Returns how many records were applied and when the newest was written.
    ``on_progress(applied, total)`` is called per batch. A record that cannot be read is
    skipped (what it named becomes unknown to the view) and passed to ``on_unreadable``; when
    the first ``UNREADABLE_AT_START`` records are all unreadable, ``StateDecodeError`` says the
    topic is not this relay's state.
    """
    tp = TopicPartition(topic, partition)
    reader = AIOKafkaConsumer(
        **connection.options(),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await start_client(reader, connection)
    try:
        reader.assign([tp])
        start = (await reader.beginning_offsets([tp]))[tp]
        end = (await reader.end_offsets([tp]))[tp]
        total = max(end - start, 0)
        applied, newest = 0, 0.0
        if total == 0:
            on_progress(0, 0)
            return Restored(0, 0.0)
        await reader.seek_to_beginning(tp)
        unreadable, seen = 0, 0  # records skipped, and read in earlier batches
        while True:
            batches = await reader.getmany(tp, timeout_ms=1000, max_records=10_000)
            batch = batches.get(tp, [])
            if batch and batch[-1].offset >= end:
                batch = [message for message in batch if message.offset < end]

            def skip(
                index: int, error: StateDecodeError, batch: list[Any] = batch, seen: int = seen
            ) -> None:
                nonlocal unreadable
                unreadable += 1
                message = batch[index]
                skipped = UnreadableRecord(
                    topic, partition, message.offset, _shown(message.key), str(error)[:300]
                )
                log.error(
                    "state record unreadable; skipped, its document is looked up again",
                    extra={
                        "topic": topic,
                        "partition": partition,
                        "offset": message.offset,
                        "key": skipped.key,
                        "reason": skipped.reason,
                    },
                )
                if unreadable == seen + index + 1 >= UNREADABLE_AT_START:
                    raise StateDecodeError(
                        f"state topic {topic!r} partition {partition}: its first {unreadable} "
                        f"records (offsets {start} to {message.offset}) are all unreadable; "
                        "check that CHOUETTE_RELAY_KAFKA__STATE_TOPIC names this relay's state "
                        "topic and that no newer relay version wrote it"
                    ) from error
                on_unreadable(skipped)

            applied += view.restore(batch, on_unreadable=skip)
            seen += len(batch)
            on_progress(applied, total)
            if batch:
                newest = max(newest, max(map(_TIMESTAMP, batch)) / 1000)
            # The position moves past compacted gaps and past what was just returned.
            if await reader.position(tp) >= end:
                return Restored(applied, newest)
    finally:
        await reader.stop()


def _shown(key: bytes | None) -> str:
    """A state key as an operator can read it, whatever its bytes."""
    if key is None:
        return "(no key)"
    return key.decode("utf-8", "backslashreplace")[:200]
