"""With a command key, a producer that may write the commands topic but lacks the key cannot
steer the relay.

Operators hold the key (``KAFKA__COMMANDS_KEY_FILE``, a mounted Secret); the CLI and the admin
endpoints sign every command with it, and each replica refuses a record that carries no MAC or a
MAC made with another key: no state record, one log line and a count, as for any refusal.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer.app.relay import Relay
from consumer.settings import KafkaSettings
from tests.fixtures.relay import AgencySpec, RelayWorld, WorldFactory
from tests.integration.operator_helpers import call, cli, cli_output, token_http

pytestmark = pytest.mark.integration

STEERED, SPARED = "agence-a", "agence-b"
SECRET = "the-operators-command-key"
MAC_HEADER = "chouette-relay-mac"


def _counted(relay: Relay, kind: str, outcome: str) -> float:
    labels = {"kind": kind, "outcome": outcome}
    return relay.registry.get_sample_value("chouette_relay_commands_total", labels) or 0.0


def _commands_read(relay: Relay) -> float:
    return sum(
        sample.value
        for family in relay.metrics.events.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["kind"] == "operator-command"
    )


def _paused(relay: Relay) -> list[list[str]]:
    partitions: dict[str, Any] = relay.status()["partitions"]
    return [p["paused"] for p in partitions.values()]


def _keyed(world: RelayWorld, tmp: Path) -> KafkaSettings:
    key_file = tmp / "commands-key"
    key_file.write_text(SECRET + "\n", encoding="utf-8")
    return world.settings().kafka.model_copy(update={"commands_key_file": key_file})


async def _pause_written_by(world: RelayWorld, agency: str, mac: bytes | None) -> None:
    """A pause of ``agency`` written straight to the topic by a producer with write rights."""
    value = orjson.dumps(
        {
            "schema_version": 1,
            "command": "pause",
            "agency_id": agency,
            "requested_at": dt.datetime.now(dt.UTC).isoformat(),
            "requested_by": "intruder",
        }
    )
    headers = [] if mac is None else [(MAC_HEADER, mac)]
    producer = await world.producer()
    for partition in sorted(await producer.partitions_for(world.commands_topic)):
        await producer.send_and_wait(
            world.commands_topic,
            key=agency.encode(),
            value=value,
            partition=partition,
            headers=headers,
        )


async def test_only_commands_signed_with_the_operators_key_are_carried_out(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(
        agencies={
            STEERED: AgencySpec(buildings={"bat-1": "c-1"}),
            SPARED: AgencySpec(buildings={"bat-2": "c-2"}),
        }
    )
    keyed = _keyed(world, world.tmp)
    relay = await world.start_relay(kafka=keyed, http=token_http(world.tmp))

    await _pause_written_by(world, SPARED, None)
    await _pause_written_by(world, SPARED, b"0" * 64)  # a MAC made without the key
    # A CLI without the key writes unsigned: every replica refuses it, and the CLI says so.
    _, refused = await cli_output(world, "pause", SPARED, expect=1)
    assert "refused on partitions 0-2: the command is not signed" in refused
    await world.wait_until(lambda: _commands_read(relay) == 9, what="the three pauses read")

    assert _paused(relay) == [[], [], []]
    assert _counted(relay, "pause", "unsigned") == 6
    assert _counted(relay, "pause", "bad_signature") == 3

    await cli(world, "pause", STEERED, kafka=keyed)
    await world.wait_until(lambda: _paused(relay) == [[STEERED]] * 3, what="the signed pause")
    status, _ = await call(relay, "POST", f"/admin/agencies/{STEERED}/resume", token=True)
    assert status == 202
    await world.wait_until(lambda: _paused(relay) == [[], [], []], what="the signed resume")

    state = await world.read_topic(world.state_topic)
    assert not [record for record in state if record.key.startswith(SPARED.encode())]
    assert _counted(relay, "pause", "carried_out") == 3
    assert _counted(relay, "resume", "carried_out") == 3
    refused = relay.status()["refused_commands"]
    assert refused["total"] == 9
    assert {entry["reason"] for entry in refused["newest"]} == {"unsigned", "bad_signature"}
