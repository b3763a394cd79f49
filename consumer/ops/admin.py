"""Operator commands from the command line: list, release or discard held deletions.

They talk to Kafka directly, not to one replica: ``held`` reads every partition of the relay's
state topic, and ``release``/``discard`` write a command that the replica owning the building
carries out (see ``consumer.core.commands``). Nothing here needs to know which pod owns what.
"""

from __future__ import annotations

import datetime as dt
import getpass
import socket
import sys
from collections import Counter

import orjson
from aiokafka import AIOKafkaProducer

from consumer.core.commands import HeldAction, OperatorCommand
from consumer.core.state import DocStatus
from consumer.core.view import PublishedView
from consumer.errors import ConfigError
from consumer.kafka.changelog import restore_partition, topic_partitions
from consumer.kafka.commands import send_command
from consumer.kafka.connection import KafkaConnection, kafka_connection, start_client
from consumer.settings import Settings


def _require_kafka(settings: Settings) -> KafkaConnection:
    if not settings.kafka.bootstrap_servers:
        raise ConfigError(
            "set CHOUETTE_RELAY_KAFKA__BOOTSTRAP_SERVERS (and the topic names, if not the "
            "defaults) to reach the relay's topics"
        )
    return kafka_connection(settings.kafka)


async def held_deletions(settings: Settings) -> list[dict[str, object]]:
    """Every building with withdrawals held by the mass-deletion guard, across all partitions."""
    connection = _require_kafka(settings)
    partitions = await topic_partitions(connection, settings.kafka.state_topic) or 0
    found: Counter[tuple[str, str, str]] = Counter()
    for partition in range(partitions):
        view = PublishedView()
        await restore_partition(
            connection=connection,
            topic=settings.kafka.state_topic,
            partition=partition,
            view=view,
        )
        for record in view.with_status(DocStatus.DELETE_HELD):
            found[(record.key.agency_id, record.key.building_id, record.held_by or "")] += 1
    return [
        {"agency": agency, "building": building, "snapshot_id": snapshot, "documents": count}
        for (agency, building, snapshot), count in sorted(found.items())
    ]


async def queue_command(
    settings: Settings, action: HeldAction, agency_id: str, building_id: str
) -> dict[str, object]:
    connection = _require_kafka(settings)
    command = OperatorCommand(
        command=action,
        agency_id=agency_id,
        building_id=building_id,
        requested_at=dt.datetime.now(dt.UTC),
        requested_by=f"cli:{getpass.getuser()}@{socket.gethostname()}",
    )
    producer = AIOKafkaProducer(**connection.options(), acks="all")
    await start_client(producer, connection)
    try:
        partition, offset = await send_command(producer, settings.kafka.commands_topic, command)
    finally:
        await producer.stop()
    return {
        "queued": action.value,
        "agency": agency_id,
        "building": building_id,
        "partition": partition,
        "offset": offset,
    }


async def run_admin(
    settings: Settings, command: str, *, agency: str | None, building: str | None
) -> int:
    if command == "held":
        result: object = {"held": await held_deletions(settings)}
    else:
        if agency is None or building is None:
            raise ConfigError(f"{command} needs AGENCY and BUILDING")
        result = await queue_command(settings, HeldAction(command), agency, building)
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0
