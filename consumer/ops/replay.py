"""Dead letters for the operator: list them, and replay selected ones to their source topic once.

A dead letter is named by where its record came from, ``topic/partition/offset``. Replaying it
writes the original key, value and headers back to the same partition of the source topic, with
one more header, ``chouette-relay-replay-of: topic/partition/offset``. The source topic itself is
the memory of replays: before replaying, the partition is scanned from the original offset on for
a copy carrying that header, and a second replay is refused unless forced. No other state can
drift from it, and a copy that is read again after a restart is not a second replay.
"""

from __future__ import annotations

import base64
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from consumer.kafka.connection import KafkaConnection
from consumer.kafka.startup import start_client

REPLAY_HEADER = "chouette-relay-replay-of"


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

    def listing(self) -> dict[str, Any]:
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


async def replayed_already(connection: KafkaConnection, letters: list[DeadLetter]) -> set[str]:
    """Ids of ``letters`` that a copy in their source partition says were replayed already."""
    wanted = {letter.id for letter in letters}
    starts: dict[str, dict[int, int]] = defaultdict(dict)
    for letter in letters:
        known = starts[letter.source_topic].get(letter.source_partition)
        start = letter.source_offset + 1
        starts[letter.source_topic][letter.source_partition] = min(known or start, start)
    seen: set[str] = set()
    for topic, partitions in starts.items():
        async for _, record in _scan(connection, topic, starts=partitions):
            for name, raw in record.headers or ():
                if name == REPLAY_HEADER and raw is not None and raw.decode() in wanted:
                    seen.add(raw.decode())
    return seen


async def replay(
    connection: KafkaConnection,
    producer: AIOKafkaProducer,
    letters: list[DeadLetter],
    *,
    force: bool,
) -> list[dict[str, Any]]:
    """Re-publish each selected dead letter to its source partition once; what happened to each."""
    unique = list({letter.id: letter for letter in letters}.values())
    done = set() if force else await replayed_already(connection, unique)
    results: list[dict[str, Any]] = []
    for letter in unique:
        if letter.value is None:
            results.append(_refused(letter, "the original value is not in the dead letter"))
            continue
        if letter.id in done:
            results.append(_refused(letter, "replayed already; use --force to replay it again"))
            continue
        headers = [(n, v) for n, v in letter.headers if n != REPLAY_HEADER and v is not None]
        headers.append((REPLAY_HEADER, letter.id.encode()))
        metadata = await producer.send_and_wait(
            letter.source_topic,
            value=letter.value,
            key=letter.key,
            headers=headers,
            partition=letter.source_partition,
        )
        results.append(
            {
                "id": letter.id,
                "outcome": "replayed",
                "partition": int(metadata.partition),
                "offset": int(metadata.offset),
            }
        )
    return results


def _refused(letter: DeadLetter, why: str) -> dict[str, Any]:
    return {"id": letter.id, "outcome": "refused", "why": why}


async def _scan(
    connection: KafkaConnection, topic: str, *, starts: dict[int, int] | None
) -> AsyncIterator[tuple[int, Any]]:
    """Yield ``(partition, record)`` from each partition (from ``starts[p]``, or every partition
    from its beginning) up to the end seen when the scan started."""
    reader = AIOKafkaConsumer(
        **connection.options(), enable_auto_commit=False, auto_offset_reset="earliest"
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
        ends = await reader.end_offsets(tps)
        for tp in tps:
            if starts is None:
                await reader.seek_to_beginning(tp)
            else:
                reader.seek(tp, starts[tp.partition])
        remaining = {tp for tp in tps if await reader.position(tp) < ends[tp]}
        while remaining:
            batches = await reader.getmany(*remaining, timeout_ms=500, max_records=5000)
            for tp, batch in batches.items():
                for record in batch:
                    if record.offset < ends[tp]:
                        yield tp.partition, record
            for tp in list(remaining):
                if await reader.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await reader.stop()
