"""Each assigned partition starts on its own: restored, reconciled, then read.

A state record the relay cannot read is skipped, logged, counted and listed, and its document is
looked up on the partner before it is sent again; a state topic whose first records are all
unreadable stops start-up with a message naming it; and a partition whose start is held (its
reconcile waiting for the partner) holds no other partition back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from consumer.app.relay import Relay
from consumer.core.routing import load_routing
from consumer.core.state import StateDecodeError
from consumer.kafka.changelog import UNREADABLE_AT_START
from consumer.partner.keys import ApiKeyStore
from consumer.partner.reconcile import reconcile_partition
from tests.fixtures.relay import AgencySpec, RelayWorld, WorldFactory, building_on, metric

pytestmark = pytest.mark.integration

AGENCY = "agence-a"
PARTITIONS = 3


def _copies(world: RelayWorld, reference: str) -> int:
    return sum(1 for d in world.sandbox.documents() if d.reference == reference)


async def _write_state(world: RelayWorld, partition: int, key: bytes, value: bytes | None) -> None:
    producer = await world.producer()
    await producer.send_and_wait(world.state_topic, key=key, value=value, partition=partition)


async def _run(world: RelayWorld) -> tuple[Relay, asyncio.Task[None]]:
    """A relay started without waiting for it to be ready."""
    relay = Relay(
        settings=world.settings(),
        routing=load_routing(world.routing_file),
        api_keys=ApiKeyStore(world.keys_dir),
    )
    task = asyncio.create_task(relay.run(), name="relay-under-test")
    world.relays.append((relay, task))
    return relay, task


async def test_an_unreadable_state_record_is_skipped_counted_listed_and_looked_up_again(
    relay_world: WorldFactory,
) -> None:
    building = building_on(AGENCY, 1, PARTITIONS)
    world = await relay_world(
        agencies={AGENCY: AgencySpec(buildings={building: "c-1"})}, partitions=PARTITIONS
    )
    first = world.document()
    relay = await world.start_relay()
    await world.publish(world.document_created(AGENCY, building, first))
    await world.wait_until(lambda: first["id"] in world.partner_references(), what="first sent")
    await world.stop_relay(relay)

    # The newest record of the published document becomes unreadable, and a record whose key
    # names nothing lands beside it.
    await _write_state(world, 1, f"{AGENCY}:{building}:{first['id']}".encode(), b"\x00garbage")
    await _write_state(world, 1, b"\xff\xfe", b"{}")

    relay = await world.start_relay()  # ready: the skipped records do not stall it

    assert await metric(relay, "chouette_relay_state_records_unreadable_total", partition="1") == 2
    listed = relay.status()["unreadable_state_records"]
    assert [(entry["partition"], entry["key"]) for entry in listed] == [
        (1, f"{AGENCY}:{building}:{first['id']}"),
        (1, "\\xff\\xfe"),
    ]
    assert all(entry["topic"] == world.state_topic and entry["reason"] for entry in listed)

    # LSC publishes the document again, and a new one: the first is found on the partner by its
    # reference (not created twice), the second is sent.
    second = world.document()
    await world.publish(
        world.document_created(AGENCY, building, first),
        world.document_created(AGENCY, building, second),
    )
    await world.wait_until(lambda: second["id"] in world.partner_references(), what="second sent")
    await world.wait_until(
        lambda: all(p["pending_operations"] == 0 for p in relay.status()["partitions"].values()),
        what="idle",
    )
    assert _copies(world, first["id"]) == 1
    assert _copies(world, second["id"]) == 1
    assert relay._ingest is not None
    view = relay._ingest.processors[1].view
    assert not any(view.is_unknown(d.key) for d in view.documents(AGENCY, building))


async def test_a_state_topic_whose_first_records_are_all_unreadable_stops_start_up(
    relay_world: WorldFactory, caplog: pytest.LogCaptureFixture
) -> None:
    world = await relay_world(
        agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})}, partitions=PARTITIONS
    )
    relay = await world.start_relay()  # creates the state topic
    await world.stop_relay(relay)
    for number in range(UNREADABLE_AT_START):
        await _write_state(world, 2, f"x:y:{number}".encode(), orjson.dumps({"kind": "future"}))

    relay, task = await _run(world)
    await asyncio.wait_for(task, timeout=60)  # stops on its own

    assert isinstance(relay.failure, StateDecodeError)
    message = str(relay.failure)
    assert world.state_topic in message
    assert "partition 2" in message
    assert "CHOUETTE_RELAY_KAFKA__STATE_TOPIC" in message
    critical = [r for r in caplog.records if r.levelname == "CRITICAL"]
    assert len(critical) == 1


@pytest.fixture
def held_reconcile(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[set[int], asyncio.Event]]:
    """Holds the reconcile of the partitions put in the returned set until the event is set:
    a partition whose upload intents wait for a partner that does not answer."""
    held: set[int] = set()
    gate = asyncio.Event()

    async def reconcile(**arguments: Any) -> None:
        if arguments["writer"]._partition in held:
            await gate.wait()
        await reconcile_partition(**arguments)

    monkeypatch.setattr("consumer.app.relay.reconcile_partition", reconcile)
    yield held, gate
    gate.set()


async def test_a_partition_held_at_start_holds_no_other_partition_back(
    relay_world: WorldFactory,
    held_reconcile: tuple[set[int], asyncio.Event],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr("consumer.app.relay.RECONCILE_NOTICE_S", 0.2)
    held, gate = held_reconcile
    held.add(0)
    buildings = {p: building_on(AGENCY, p, PARTITIONS) for p in range(PARTITIONS)}
    world = await relay_world(
        agencies={AGENCY: AgencySpec(buildings={b: f"c-{p}" for p, b in buildings.items()})},
        partitions=PARTITIONS,
    )
    documents = {p: world.document() for p in buildings}
    await world.publish(
        *(world.document_created(AGENCY, buildings[p], documents[p]) for p in buildings)
    )

    relay, task = await _run(world)
    await world.wait_until(
        lambda: (
            {documents[1]["id"], documents[2]["id"]} <= set(world.partner_references())
            or task.done()
        ),
        timeout=60,
        what="the other partitions' documents sent",
    )
    assert not task.done()
    assert documents[0]["id"] not in world.partner_references()
    assert not relay.is_ready()
    assert "0" in relay.status()["restoring"]

    def waiting() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith("partition waits for")]

    await world.wait_until(lambda: bool(waiting()), what="the held partition says it waits")
    assert {getattr(r, "partition", None) for r in waiting()} == {0}

    gate.set()
    await world.wait_until(relay.is_ready, timeout=60, what="ready")
    await world.wait_until(
        lambda: documents[0]["id"] in world.partner_references(), what="held partition's document"
    )
