"""Sends an operator command to the commands topic, keyed so it reaches the owning replica.

The command model and its decoding are pure and live apart; this is only the producer call, used
by the composition root and the admin CLI.
"""

from __future__ import annotations

import orjson
from aiokafka import AIOKafkaProducer

from consumer.core.commands import OperatorCommand


async def send_command(
    producer: AIOKafkaProducer, topic: str, command: OperatorCommand
) -> list[tuple[int, int]]:
    """Send ``command``; returns the partitions and offsets it was written to.

    A building's command goes where its key leads (the building's partition number); an agency's
    goes to every partition of the topic.
    """
    value = orjson.dumps(command.model_dump(mode="json", exclude_none=True))
    if command.building_id is not None:
        targets: list[int | None] = [None]
    else:
        targets = sorted(await producer.partitions_for(topic))
    deliveries = [
        await producer.send(topic, value=value, key=command.key, partition=partition)
        for partition in targets
    ]
    written = []
    for delivery in deliveries:
        metadata = await delivery
        written.append((int(metadata.partition), int(metadata.offset)))
    return written
