"""Dead letters for the operator: list them, and replay selected ones to their source topic once.

A dead letter is named by where its record came from, ``topic/partition/offset``. Replaying it
writes the original key, value and headers back to the same partition of the source topic, with
one more header, ``chouette-relay-replay-of: topic/partition/offset``. The source topic itself is
the memory of replays: before replaying, the partition is scanned from the original offset on for
a copy carrying that header, and a second replay is refused unless forced. No other state can
drift from it, and a copy that is read again after a restart is not a second replay.

One scan serves every selected dead letter; then each replay is a Kafka transaction whose
transactional id is the dead letter's (``chouette-relay-replay:topic/partition/offset``), begun
before it reads what its partition received since that scan: a second run replaying the same
dead letter at the same time fences the first, whose copy is then never committed, and its own
reading sees a copy the first committed before. The relay reads its input
``read_committed``, so however many runs race, it reads one copy; a run that dies mid-replay
leaves an open transaction that the broker aborts after ``REPLAY_TRANSACTION_TIMEOUT_MS``.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import ProducerFenced

from consumer.kafka.connection import KafkaConnection
from consumer.kafka.startup import start_client

REPLAY_HEADER = "chouette-relay-replay-of"
REPLAY_TRANSACTION_TIMEOUT_MS = 10_000
"""How long the records behind a replay that died mid-transaction wait (the relay reads its
input ``read_committed``): the broker aborts the transaction after this."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of the dead-letter topic, its envelope unpacked."""

    offset: int  # in the dead-letter topic
    reason: str
    detail: str
    failed_at: str
    source_topic: str
    source_partition: int
    source_offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]

    @property
    def id(self) -> str:
        return f"{self.source_topic}/{self.source_partition}/{self.source_offset}"

    def listing(self, replayed_at: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "reason": self.reason,
            "detail": self.detail,
            "failed_at": self.failed_at,
            "source": {
                "topic": self.source_topic,
                "partition": self.source_partition,
                "offset": self.source_offset,
            },
            "key": None if self.key is None else self.key.decode("utf-8", "backslashreplace"),
            "replayable": self.value is not None,
            # A replay that failed again: the dead letter it was a replay of.
            "replay_of": self.replay_of,
            # When a copy of it was written to its source partition, if one was.
            "replayed": replayed_at is not None,
            "replayed_at": replayed_at,
        }

    @property
    def replay_of(self) -> str | None:
        for name, value in self.headers:
            if name == REPLAY_HEADER and value is not None:
                return value.decode("utf-8", "backslashreplace")
        return None


def unpack(offset: int, value: bytes) -> DeadLetter | None:
    """The dead letter in ``value`` (``schemas/dead-letter.v1``), or None if it is not one."""
    try:
        data = orjson.loads(value)
        source, record = data["source"], data["record"]
        return DeadLetter(
            offset=offset,
            reason=str(data["reason"]),
            detail=str(data["detail"]),
            failed_at=str(data["failed_at"]),
            source_topic=str(source["topic"]),
            source_partition=int(source["partition"]),
            source_offset=int(source["offset"]),
            key=_unb64(record["key_base64"]),
            value=_unb64(record["value_base64"]),
            headers=tuple((h["key"], _unb64(h["value_base64"])) for h in record["headers"]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


async def read_dead_letters(connection: KafkaConnection, topic: str) -> list[DeadLetter]:
    """Every dead letter currently in ``topic``, oldest first (in each partition), one per
    source record.

    The relay writes one dead letter per source record; a second one for the same record (written
    by a relay older than that rule, or by two replicas at once in a rebalance) is left out, so
    that what is listed and counted is the records set aside, each once.
    """
    found: dict[str, DeadLetter] = {}
    async for _, record in _scan(connection, topic, starts=None):
        if record.value is not None and (letter := unpack(record.offset, record.value)):
            found.setdefault(letter.id, letter)
    return list(found.values())


@dataclass(frozen=True, slots=True)
class ReplayScan:
    """What a scan of source partitions for replayed copies found, and how far it read."""

    replayed_at: dict[str, str]  # dead letter id -> time of its first committed copy, ISO 8601
    reached: dict[tuple[str, int], int]  # (topic, partition) -> the offset it read up to


async def replayed_already(
    connection: KafkaConnection,
    letters: list[DeadLetter],
    *,
    after: dict[tuple[str, int], int] | None = None,
) -> ReplayScan:
    """Which of ``letters`` were replayed, and when: their committed copies in their source
    partitions, read from each letter's offset on (or from where an earlier scan, ``after``,
    stopped: it saw what came before)."""
    wanted = {letter.id for letter in letters}
    starts: dict[str, dict[int, int]] = defaultdict(dict)
    for letter in letters:
        place = (letter.source_topic, letter.source_partition)
        start = max(letter.source_offset + 1, (after or {}).get(place, 0))
        known = starts[letter.source_topic].get(letter.source_partition)
        starts[letter.source_topic][letter.source_partition] = min(known or start, start)
    seen: dict[str, str] = {}
    reached: dict[tuple[str, int], int] = {}
    for topic, partitions in starts.items():
        ends: dict[int, int] = {}
        async for _, record in _scan(connection, topic, starts=partitions, ends=ends):
            for name, raw in record.headers or ():
                if name == REPLAY_HEADER and raw is not None and raw.decode() in wanted:
                    when = dt.datetime.fromtimestamp(record.timestamp / 1000, dt.UTC)
                    seen.setdefault(raw.decode(), when.isoformat().replace("+00:00", "Z"))
        reached.update({(topic, partition): end for partition, end in ends.items()})
    return ReplayScan(seen, reached)


async def replay(
    connection: KafkaConnection, letters: list[DeadLetter], *, force: bool
) -> list[dict[str, Any]]:
    """Re-publish each selected dead letter to its source partition once; what happened to each."""
    unique = list({letter.id: letter for letter in letters}.values())
    # One scan for them all first; each replay then reads only what was written since.
    scan = ReplayScan({}, {}) if force else await replayed_already(connection, unique)
    results: list[dict[str, Any]] = []
    for letter in unique:
        if letter.value is None:
            results.append(_refused(letter, "the original value is not in the dead letter"))
        elif letter.id in scan.replayed_at:
            results.append(_refused(letter, _REPLAYED))
        else:
            results.append(await _replay_once(connection, letter, force=force, after=scan.reached))
    return results


async def _replay_once(
    connection: KafkaConnection,
    letter: DeadLetter,
    *,
    force: bool,
    after: dict[tuple[str, int], int],
) -> dict[str, Any]:
    """Replay one dead letter in a transaction of its own id, begun before the scan for a copy:
    a concurrent replay of it fences this one (or this one sees the copy it committed)."""
    producer = AIOKafkaProducer(
        **connection.options(),
        transactional_id=f"chouette-relay-replay:{letter.id}",
        transaction_timeout_ms=REPLAY_TRANSACTION_TIMEOUT_MS,
    )
    await start_client(producer, connection)  # fences any earlier run replaying this letter
    try:
        if not force and (await replayed_already(connection, [letter], after=after)).replayed_at:
            return _refused(letter, _REPLAYED)
        headers = [(n, v) for n, v in letter.headers if n != REPLAY_HEADER and v is not None]
        headers.append((REPLAY_HEADER, letter.id.encode()))
        try:
            async with producer.transaction():
                metadata = await producer.send_and_wait(
                    letter.source_topic,
                    value=letter.value,
                    key=letter.key,
                    headers=headers,
                    partition=letter.source_partition,
                )
        except ProducerFenced:
            return _refused(letter, _CONCURRENT)
        return {
            "id": letter.id,
            "outcome": "replayed",
            "partition": int(metadata.partition),
            "offset": int(metadata.offset),
        }
    finally:
        with contextlib.suppress(ProducerFenced):
            await producer.stop()


_REPLAYED = "replayed already; use --force to replay it again"
_CONCURRENT = (
    "another replay of this dead letter ran at the same time and replays it; see dead-letters"
)


def _refused(letter: DeadLetter, why: str) -> dict[str, Any]:
    return {"id": letter.id, "outcome": "refused", "why": why}


async def _scan(
    connection: KafkaConnection,
    topic: str,
    *,
    starts: dict[int, int] | None,
    ends: dict[int, int] | None = None,
) -> AsyncIterator[tuple[int, Any]]:
    """Yield ``(partition, record)`` from each partition (from ``starts[p]``, or every partition
    from its beginning) up to the end seen when the scan started, which goes into ``ends``."""
    reader = AIOKafkaConsumer(
        **connection.options(),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",  # a replay fenced or dead mid-way wrote no copy
    )
    await start_client(reader, connection)
    try:
        await reader.topics()
        known = reader.partitions_for_topic(topic) or set()
        chosen = sorted(known) if starts is None else sorted(set(starts) & known)
        tps = [TopicPartition(topic, p) for p in chosen]
        if not tps:
            return
        reader.assign(tps)
        last = await reader.end_offsets(tps)
        if ends is not None:
            ends.update({tp.partition: offset for tp, offset in last.items()})
        for tp in tps:
            if starts is None:
                await reader.seek_to_beginning(tp)
            else:
                reader.seek(tp, starts[tp.partition])
        remaining = {tp for tp in tps if await reader.position(tp) < last[tp]}
        while remaining:
            batches = await reader.getmany(*remaining, timeout_ms=500, max_records=5000)
            for tp, batch in batches.items():
                for record in batch:
                    if record.offset < last[tp]:
                        yield tp.partition, record
            for tp in list(remaining):
                if await reader.position(tp) >= last[tp]:
                    remaining.discard(tp)
    finally:
        await reader.stop()
