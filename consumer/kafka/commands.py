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
) -> tuple[int, int]:
    """Send ``command``; returns the partition and offset it was written to."""
    value = orjson.dumps(command.model_dump(mode="json"))
    delivery = await producer.send(topic, value=value, key=command.key)
    metadata = await delivery
    return int(metadata.partition), int(metadata.offset)
