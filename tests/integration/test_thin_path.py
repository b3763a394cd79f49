"""A document published by LSC reaches ChouetteCopro; the thinnest path through the whole relay."""

from __future__ import annotations

import pytest

from tests.fixtures.relay import AgencySpec, WorldFactory

pytestmark = pytest.mark.integration


async def test_a_document_created_event_becomes_a_document_in_the_sandbox(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={"agence-a": AgencySpec(buildings={"bat-1": "c-1"})})
    await world.start_relay()
    document = world.document(title="PV AG 2025")

    await world.publish(world.document_created("agence-a", "bat-1", document))

    await world.wait_until(
        lambda: document["id"] in world.partner_references("c-1"), what="the upload"
    )
    held = world.sandbox.documents("c-1")
    assert [(d.reference, d.title, d.sha256) for d in held] == [
        (document["id"], "PV AG 2025", document["content"]["sha256"])
    ]
