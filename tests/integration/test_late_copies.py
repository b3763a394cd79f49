"""A create the partner carries out later than the relay waited is found, across a restart.

The create times out, the relay waits ``PARTNER__IN_DOUBT_SETTLE_S``, finds nothing and sends the
document again; the partner then carries out the first create too. The document owes late-copy
checks (``PARTNER__LATE_COPY_CHECKS_S``), kept in its state record: the relay is killed before
the late copy appears, and the one that takes the partition over makes the checks and withdraws
the copy its view does not record. Real broker, real sandbox, a relay process killed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer.core.state import DocumentRecord
from consumer.core.state_codec import decode_state
from consumer.local.sandbox import Answer, Scripted
from consumer.settings import PartnerSettings
from tests.fixtures.relay import AgencySpec, Json, RelayWorld, WorldFactory, metric

pytestmark = pytest.mark.integration

AGENCY = "agence-a"
LATE_S = 14.0
"""When the partner carries out the first create: after the document was sent again (at about
2 s), after the killed relay's successor has the partition, between two checks."""


def copies(world: RelayWorld, document: Json) -> list[str]:
    return [d.id for d in world.sandbox.documents("c-1") if d.reference == document["id"]]


async def owing_record(world: RelayWorld, document: Json) -> DocumentRecord | None:
    """The document's newest state record, if it owes late-copy checks."""
    newest = None
    for record in await world.read_topic(world.state_topic):
        if record.key.endswith(document["id"].encode()) and record.value is not None:
            newest = decode_state(record.key, record.value)
    if isinstance(newest, DocumentRecord) and newest.late_copy_checks is not None:
        return newest
    return None


async def test_a_create_carried_out_late_after_a_restart_leaves_one_copy(
    relay_world: WorldFactory, tmp_path: Path
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    world.sandbox.script("POST", Scripted(Answer.LATE, delay_s=LATE_S))
    partner = PartnerSettings(
        **{
            **world.settings().partner.model_dump(),
            "concurrency": 1,
            "timeout_s": 1.0,
            "in_doubt_settle_s": 1.0,
            "late_copy_checks_s": (4.0, 8.0, 20.0, 24.0),
        }
    )
    process = world.spawn_relay(tmp_path / "relay.log", partner=partner)
    document = world.document(title="PV AG 2025")

    await world.publish(world.document_created(AGENCY, "bat-1", document))
    # Sent again once the lookup found nothing: one copy, the first create still in flight.
    await world.wait_until(
        lambda: len(copies(world, document)) == 1 and world.sandbox.in_flight == 1,
        timeout=30,
        what="the document sent again",
    )
    owing = None

    async def recorded() -> bool:
        nonlocal owing
        owing = await owing_record(world, document)
        return owing is not None

    await world.wait_until(recorded, timeout=30, what="the checks owed on the state topic")
    assert owing is not None
    assert [owing.remote_id] == copies(world, document)
    world.kill(process)

    relay = await world.start_relay(partner=partner)
    await world.wait_until(
        lambda: sum(p["late_copy_checks_owed"] for p in relay.status()["partitions"].values()) == 1,
        timeout=60,
        what="the restarted relay owing the checks",
    )
    await world.wait_until(lambda: world.sandbox.in_flight == 0, timeout=60, what="the late create")

    async def one_copy_left() -> bool:
        found = await metric(relay, "chouette_relay_late_copy_checks_total", outcome="found")
        return found == 1.0 and len(copies(world, document)) == 1

    await world.wait_until(one_copy_left, timeout=60, what="the late copy withdrawn")
    assert copies(world, document) == [owing.remote_id]  # the copy the view records stays
    assert world.sandbox.create_count(document["id"]) == 2  # the late create did happen
    duplicate = await metric(
        relay,
        "chouette_relay_operations_total",
        lane="live",
        operation="delete",
        outcome="duplicate",
    )
    assert duplicate == 1.0
    assert await world.dead_letters() == []


async def test_a_create_a_killed_relay_sent_carried_out_after_the_restart_leaves_one_copy(
    relay_world: WorldFactory, tmp_path: Path
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    # The relay is killed as soon as the create is sent; its successor's lookup (once the
    # create's timeout and the settle time have passed) finds nothing and sends the document,
    # and only then does the partner carry out the first create.
    world.sandbox.script("POST", Scripted(Answer.LATE, delay_s=16.0))
    partner = PartnerSettings(
        **{
            **world.settings().partner.model_dump(),
            "timeout_s": 2.0,
            "in_doubt_settle_s": 1.0,
            "late_copy_checks_s": (2.0, 4.0, 10.0, 20.0),
        }
    )
    process = world.spawn_relay(tmp_path / "relay.log", partner=partner)
    document = world.document(title="Contrat d'assurance")

    await world.publish(world.document_created(AGENCY, "bat-1", document))
    await world.wait_until(lambda: world.sandbox.in_flight == 1, what="the create sent")
    world.kill(process)

    relay = await world.start_relay(partner=partner)
    await world.wait_until(
        lambda: len(copies(world, document)) == 1 and world.sandbox.in_flight == 1,
        timeout=60,
        what="the document sent by the successor, the first create still in flight",
    )
    (sent,) = copies(world, document)
    await world.wait_until(lambda: world.sandbox.in_flight == 0, timeout=60, what="the late create")

    async def one_copy_left() -> bool:
        found = await metric(relay, "chouette_relay_late_copy_checks_total", outcome="found")
        return found == 1.0 and len(copies(world, document)) == 1

    await world.wait_until(one_copy_left, timeout=60, what="the late copy withdrawn")
    assert copies(world, document) == [sent]
    assert world.sandbox.create_count(document["id"]) == 2
    assert await world.dead_letters() == []
