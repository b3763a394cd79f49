"""A repair command carries what to check, not what to delete.

A producer with write rights on the commands topic writes a repair straight to it, naming a
document made by hand in ChouetteCopro and the relay's own published document as copies to
withdraw, and the relay's document as missing. The replica that carries it out looks each
reference up on the partner itself: it withdraws the one stray copy of the relay's that the
lookup shows and its view does not hold, and touches nothing else: the hand-made document and the
relay's own stay, and the relay's is not sent a second time.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.fixtures.relay import AgencySpec, Json, RelayWorld, WorldFactory

pytestmark = pytest.mark.integration

AGENCY, BUILDING = "agence-a", "bat-1"


def _remote_id(world: RelayWorld, document: Json) -> str:
    [found] = [d.id for d in world.sandbox.documents() if d.reference == document["id"]]
    return found


def _unexpected(document_id: str, remote_id: str) -> dict[str, Any]:
    return {"kind": "unexpected", "document_id": document_id, "remote_id": remote_id}


async def _committed(world: RelayWorld, partition: int) -> int:
    """The relay's committed offset on one partition of the commands topic (0 before any)."""
    reader = AIOKafkaConsumer(
        bootstrap_servers=world.bootstrap, group_id=world.group_id, enable_auto_commit=False
    )
    await reader.start()
    try:
        return await reader.committed(TopicPartition(world.commands_topic, partition)) or 0
    finally:
        await reader.stop()


async def test_a_forged_repair_deletes_nothing_made_by_hand_and_nothing_the_view_holds(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={BUILDING: "c-1"})})
    await world.start_relay()
    ours, duplicated = world.document(), world.document()
    await world.publish(*world.manifest_parts(AGENCY, BUILDING, [ours, duplicated]))
    await world.wait_until(lambda: len(world.partner_references()) == 2, what="2 published")
    hand_made = world.sandbox.seed_manual_document("c-1", "Affiche posée à la main")
    own = _remote_id(world, ours)
    stray = world.sandbox.seed_copy(_remote_id(world, duplicated))
    deletes_before = world.sandbox.request_count("DELETE")

    findings = [
        _unexpected("reglement-affiche", hand_made),  # made by hand: no reference at all
        _unexpected(ours["id"], hand_made),  # made by hand, passed off as a copy of ours
        _unexpected("doc-unknown", own),  # the relay's own, under a reference it never used
        {
            "kind": "missing",
            "document_id": ours["id"],
            "remote_id": own,
            "view_sha256": ours["content"]["sha256"],
        },
        _unexpected(duplicated["id"], stray),  # the one stray copy, which the lookup confirms
    ]
    command = {
        "schema_version": 1,
        "command": "repair",
        "agency_id": AGENCY,
        "building_id": BUILDING,
        "findings": findings,
        "requested_at": "2026-01-02T03:04:05Z",
        "requested_by": "forged",
    }
    producer = await world.producer()
    written = await producer.send_and_wait(
        world.commands_topic, key=f"{AGENCY}:{BUILDING}".encode(), value=orjson.dumps(command)
    )

    # The command's offset is committed once all the work it caused is done.
    await world.wait_until(
        lambda: _done(world, written.partition, written.offset), what="the repair carried out"
    )
    assert world.sandbox.document(stray) is None
    assert world.sandbox.document(hand_made) is not None
    assert world.sandbox.document(own) is not None
    assert world.sandbox.request_count("DELETE") == deletes_before + 1
    assert world.sandbox.create_count(ours["id"]) == 1
    assert world.partner_references("c-1") == {
        d["id"]: d["content"]["sha256"] for d in (ours, duplicated)
    }


async def _done(world: RelayWorld, partition: int, offset: int) -> bool:
    return await _committed(world, partition) > offset
