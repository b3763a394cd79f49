"""Reading one input partition again, for the documents an audit's repair must send again.

The relay keeps no published document's content; its input does, for as long as the topics retain
it. A short-lived consumer, assigned to the one partition (no group, nothing committed), reads
each input topic from its first offset up to where the relay's own reading stands.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.core.audit import Resend, keep_newest
from consumer.core.decoding import Poison, decode_record
from consumer.kafka.connection import KafkaConnection
from consumer.kafka.startup import start_client

log = logging.getLogger(__name__)

_FETCH_TIMEOUT_MS = 1000


async def find_resend(
    *,
    connection: KafkaConnection,
    partition: int,
    until: Mapping[str, tuple[str, int]],
    place: tuple[str, str],
    wanted: frozenset[str],
    max_value_bytes: int,
) -> dict[str, Resend]:
    """The newest description of each ``wanted`` document of building ``place`` (agency,
    building) in ``partition`` of the input topics; ``until`` maps each topic to its kind and the
    first offset not to read (the relay's position). Documents not found are left out."""
    found: dict[str, Resend] = {}
    if not wanted:
        return found
    key = f"{place[0]}:{place[1]}".encode()
    reader = AIOKafkaConsumer(
        **connection.options(),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",  # as the relay reads it: no aborted replay
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await start_client(reader, connection)
    try:
        for topic, (kind, end) in sorted(until.items()):
            tp = TopicPartition(topic, partition)
            reader.assign([tp])
            start = (await reader.beginning_offsets([tp]))[tp]
            if end <= start:
                continue  # nothing read yet, or all of it beyond retention
            await reader.seek_to_beginning(tp)
            while await reader.position(tp) < end:
                batches = await reader.getmany(tp, timeout_ms=_FETCH_TIMEOUT_MS)
                for message in batches.get(tp, []):
                    if message.offset >= end or message.key != key:
                        continue  # another building's record: not worth decoding
                    decoded = decode_record(
                        topic_kind=kind,
                        key=message.key,
                        value=message.value,
                        headers=tuple(message.headers),
                        max_value_bytes=max_value_bytes,
                    )
                    if not isinstance(decoded, Poison):  # the relay dead-lettered it already
                        keep_newest(found, decoded, place, wanted)
                await asyncio.sleep(0)  # a long partition must not starve the other partitions
    finally:
        await reader.stop()
    log.info(
        "input read again for a repair",
        extra={"partition": partition, "wanted": len(wanted), "found": len(found)},
    )
    return found
