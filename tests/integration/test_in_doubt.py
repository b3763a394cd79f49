"""A request the relay gave up on may still be carried out: the document is never left twice.

A create that times out, loses its connection or meets a gateway's 502/504 is in doubt: the
partner may still carry it out. The relay looks the document up by reference before sending it
again, but only once ``PARTNER__IN_DOUBT_SETTLE_S`` has passed (a restarted relay's reconcile
too); a lookup that finds copies keeps one and withdraws the others. Real broker, real sandbox.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer.app.relay import Relay
from consumer.core.state import DocumentRecord
from consumer.core.state_codec import decode_state
from consumer.local.sandbox import Answer, Scripted
from consumer.settings import PartnerSettings
from tests.fixtures.relay import AgencySpec, Json, RelayWorld, WorldFactory, uncommitted_records
from tests.integration.test_crash_recovery import log_messages

pytestmark = pytest.mark.integration

AGENCY = "agence-a"


async def start(world: RelayWorld, *, settle_s: float) -> Relay:
    """One request at a time, given up after a second."""
    partner = world.settings().partner
    values = {"concurrency": 1, "timeout_s": 1.0, "in_doubt_settle_s": settle_s}
    return await world.start_relay(partner=PartnerSettings(**{**partner.model_dump(), **values}))


async def settled(world: RelayWorld, document: Json) -> None:
    """The document is on the partner and its record offset committed."""

    async def done() -> bool:
        held = world.partner_references("c-1")
        there = held.get(document["id"]) == document["content"]["sha256"]
        return there and await uncommitted_records(world) == 0

    await world.wait_until(done, timeout=30, what="the document published and committed")


async def recorded_remote_id(world: RelayWorld, document: Json) -> str | None:
    """The remote id the state topic's last record of the document gives."""
    remote_id = None
    for record in await world.read_topic(world.state_topic):
        if document["id"].encode() in record.key and record.value is not None:
            decoded = decode_state(record.key, record.value)
            if isinstance(decoded, DocumentRecord):
                remote_id = decoded.remote_id
    return remote_id


def copies(world: RelayWorld, document: Json) -> list[str]:
    return [d.id for d in world.sandbox.documents("c-1") if d.reference == document["id"]]


async def test_a_create_carried_out_after_the_relay_gave_up_is_not_sent_again(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    # The partner carries the create out 2.5 s after it came: the relay gave up after 1 s, and
    # a lookup before the partner is done would find nothing and create the document again.
    world.sandbox.script("POST", Scripted(Answer.LATE, delay_s=2.5))
    relay = await start(world, settle_s=4.0)
    document = world.document(title="PV AG 2024")

    await world.publish(world.document_created(AGENCY, "bat-1", document))

    await settled(world, document)
    await world.wait_until(lambda: world.sandbox.in_flight == 0, what="the late create done")
    assert world.sandbox.scripted_left() == 0
    assert world.sandbox.create_count(document["id"]) == 1
    assert world.sandbox.duplicated_references() == {}
    assert len(copies(world, document)) == 1
    assert relay.parked() == []
    assert await world.dead_letters() == []


async def test_copies_a_lookup_finds_are_withdrawn_but_the_one_published(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    # The create is carried out and its answer never comes; meanwhile a second copy appears
    # (what a request thought lost leaves when the partner is slower than the settle time).
    world.sandbox.script("POST", Scripted(Answer.HANG))
    relay = await start(world, settle_s=3.0)
    document = world.document(title="Contrat d'entretien")

    await world.publish(world.document_created(AGENCY, "bat-1", document))
    await world.wait_until(lambda: len(copies(world, document)) == 1, what="the hung create")
    first = copies(world, document)[0]
    second = world.sandbox.seed_copy(first)

    await settled(world, document)
    await world.wait_until(lambda: len(copies(world, document)) == 1, what="one copy left")
    (kept,) = copies(world, document)
    assert kept in (first, second)
    assert world.sandbox.create_count(document["id"]) == 1
    assert world.sandbox.duplicated_references() == {}
    assert await recorded_remote_id(world, document) == kept
    assert relay.parked() == []
    assert await world.dead_letters() == []


async def test_a_relay_killed_during_a_create_the_partner_carries_out_later_sends_it_once(
    relay_world: WorldFactory, tmp_path: Path
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    # The create is carried out 12 s after it came; the relay is killed as soon as it is sent,
    # and the next one has the partition (after the group's session timeout) and reconciles its
    # upload intent well before then.
    world.sandbox.script("POST", Scripted(Answer.LATE, delay_s=12.0))
    partner = world.settings().partner
    slow = PartnerSettings(**{**partner.model_dump(), "timeout_s": 15.0, "in_doubt_settle_s": 1.0})
    log_path = tmp_path / "relay.log"
    process = world.spawn_relay(log_path, partner=slow)
    document = world.document(title="Carnet d'entretien")

    await world.publish(world.document_created(AGENCY, "bat-1", document))
    await world.wait_until(lambda: world.sandbox.in_flight == 1, what="the create sent")
    world.kill(process)
    process = world.spawn_relay(log_path, partner=slow)

    await settled(world, document)
    await world.wait_until(lambda: world.sandbox.in_flight == 0, what="the late create done")
    assert world.sandbox.create_count(document["id"]) == 1
    assert len(copies(world, document)) == 1
    assert "waiting for uploads in doubt to settle" in log_messages(log_path)
    assert await world.dead_letters() == []
