"""Outcome records on the commands topic: written by the owning replica, read by operators.

``OutcomeWriter`` sends a replica's decision on a command to the command's own partition without
holding up the processing loop (a future per record, delivered through the broker watch, sent
again across a short outage like a dead letter). ``wait_for_outcomes`` reads the partitions a
command was written to, from its offsets on, until every one has answered or the time runs out;
``read_command_log`` reads the whole topic for the history of operator actions.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from consumer.core.commands import OperatorCommand, decode_command
from consumer.core.decoding import Poison
from consumer.core.outcomes import CommandOutcome, decode_outcome, encode_outcome, is_outcome
from consumer.kafka.brokerwatch import BrokerWatch
from consumer.kafka.connection import KafkaConnection
from consumer.kafka.reading import records_until
from consumer.kafka.startup import start_client

Place = tuple[int, int]
"""A command record's partition and offset."""


class OutcomeWriter:
    """Writes outcome records to the commands topic, each on its command's partition."""

    def __init__(self, *, producer: AIOKafkaProducer, topic: str, watch: BrokerWatch) -> None:
        self._producer = producer
        self._topic = topic
        self._watch = watch

    def submit(self, outcome: CommandOutcome) -> asyncio.Future[None]:
        """Send ``outcome``; the future ends when the broker has acknowledged it."""
        return asyncio.ensure_future(self._write(outcome))

    async def _write(self, outcome: CommandOutcome) -> None:
        value, headers = encode_outcome(outcome)

        async def send() -> Awaitable[object]:
            delivery: Awaitable[object] = await self._producer.send(
                self._topic, value=value, partition=outcome.partition, headers=headers
            )
            return delivery

        await self._watch.deliver(
            send,
            what=f"the outcome of a command for commands topic {self._topic!r}",
            operation="command_outcome",
        )


async def wait_for_outcomes(
    connection: KafkaConnection, topic: str, written: Iterable[Place], *, timeout_s: float
) -> dict[Place, CommandOutcome]:
    """The outcomes of the commands at ``written``, read from the commands topic from their
    offsets on; those that came within ``timeout_s`` (the others are missing)."""
    wanted = set(written)
    found: dict[Place, CommandOutcome] = {}
    if not wanted:
        return found
    reader = AIOKafkaConsumer(
        **connection.options(), enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await start_client(reader, connection)
    try:
        starts: dict[int, int] = {}
        for partition, offset in wanted:
            starts[partition] = min(starts.get(partition, offset), offset)
        tps = {p: TopicPartition(topic, p) for p in starts}
        reader.assign(list(tps.values()))
        for partition, tp in tps.items():
            reader.seek(tp, starts[partition])
        try:
            async with asyncio.timeout(timeout_s):
                while wanted - found.keys():
                    batches = await reader.getmany(timeout_ms=500, max_records=1000)
                    for batch in batches.values():
                        for record in batch:
                            outcome = _outcome_of(record)
                            if outcome is not None and (place := _place(outcome)) in wanted:
                                found[place] = outcome
        except TimeoutError:
            pass
    finally:
        await reader.stop()
    return found


@dataclasses.dataclass(frozen=True, slots=True)
class LoggedCommand:
    """A command as the commands topic holds it."""

    partition: int
    offset: int
    timestamp_ms: int
    command: OperatorCommand
    value: bytes  # the record's value: one agency command written to several partitions


@dataclasses.dataclass(frozen=True, slots=True)
class CommandLog:
    """Every readable command of the topic, oldest first per partition, and the last outcome
    written for each."""

    commands: list[LoggedCommand]
    outcomes: dict[Place, CommandOutcome]


async def read_command_log(connection: KafkaConnection, topic: str) -> CommandLog:
    """Read the commands topic from its beginning to its current end."""
    commands: list[LoggedCommand] = []
    outcomes: dict[Place, CommandOutcome] = {}
    reader = AIOKafkaConsumer(
        **connection.options(), enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await start_client(reader, connection)
    try:
        await reader.topics()
        tps = [TopicPartition(topic, p) for p in sorted(reader.partitions_for_topic(topic) or ())]
        if not tps:
            return CommandLog(commands, outcomes)
        reader.assign(tps)
        ends = await reader.end_offsets(tps)
        for tp in tps:
            await reader.seek_to_beginning(tp)
        async for tp, record in records_until(reader, ends):
            if is_outcome(record.headers or ()):
                if (outcome := _outcome_of(record)) is not None:
                    outcomes[_place(outcome)] = outcome  # the last one wins
                continue
            command = decode_command(record.key, record.value)
            if not isinstance(command, Poison) and record.value is not None:
                commands.append(
                    LoggedCommand(
                        tp.partition, record.offset, record.timestamp, command, record.value
                    )
                )
    finally:
        await reader.stop()
    return CommandLog(commands, outcomes)


def _outcome_of(record: Any) -> CommandOutcome | None:
    """The outcome a record of the commands topic carries, if it is one that can be read."""
    if not is_outcome(record.headers or ()):
        return None
    found = decode_outcome(record.value)
    # An outcome names its command's partition: one written elsewhere speaks of nothing here.
    if found is None or found.partition != record.partition:
        return None
    return found


def _place(outcome: CommandOutcome) -> Place:
    return outcome.partition, outcome.offset
