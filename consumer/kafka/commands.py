"""Sends an operator command to the commands topic, keyed so it reaches the owning replica.

The command model and its decoding are pure and live apart; this is only the producer call, used
by the composition root and the admin CLI.
"""

from __future__ import annotations

import orjson
from aiokafka import AIOKafkaProducer

from consumer.core.commands import MAC_HEADER, OperatorCommand, command_mac


async def send_command(
    producer: AIOKafkaProducer,
    topic: str,
    command: OperatorCommand,
    *,
    secret: bytes | None = None,
) -> list[tuple[int, int]]:
    """Send ``command``, signed with ``secret`` if given; returns the partitions and offsets it
    was written to.

    A building's command goes where its key leads (the building's partition number); an agency's
    goes to every partition of the topic.
    """
    value = orjson.dumps(command.model_dump(mode="json", exclude_none=True))
    headers = [] if secret is None else [(MAC_HEADER, command_mac(secret, command.key, value))]
    if command.building_id is not None:
        targets: list[int | None] = [None]
    else:
        targets = sorted(await producer.partitions_for(topic))
    deliveries = [
        await producer.send(
            topic, value=value, key=command.key, partition=partition, headers=headers
        )
        for partition in targets
    ]
    written = []
    for delivery in deliveries:
        metadata = await delivery
        written.append((int(metadata.partition), int(metadata.offset)))
    return written
