"""Parked documents: held back with a reason until an operator fixes the configuration.

A building missing from the routing file parks its documents (counted, listed in the status,
never dead-lettered, never lost). Once the mapping is added and the relay restarted, they are
sent; one that the partner or its content check refuses then stays parked with the refusal,
since there is no input record left to dead-letter, and the relay carries on.
"""

from __future__ import annotations

import pytest

from tests.fixtures.relay import AgencySpec, WorldFactory

pytestmark = pytest.mark.integration

AGENCY = "agence-a"


async def test_parked_documents_are_sent_once_the_building_is_mapped(
    relay_world: WorldFactory,
) -> None:
    spec = AgencySpec(buildings={"bat-1": "c-1"})
    world = await relay_world(agencies={AGENCY: spec}, partitions=1)
    relay = await world.start_relay()
    good = world.document(title="Règlement de copropriété")
    corrupt = world.document(title="Contrat d'entretien")
    # The store will serve other bytes than the event announces: refused once it is sent.
    name = corrupt["content"]["url"].rsplit("/", 1)[1].removesuffix(".pdf")
    world.store.add_bytes(name, b"%PDF-1.4 not the announced document")

    await world.publish(
        world.document_created(AGENCY, "bat-9", good),
        world.document_created(AGENCY, "bat-9", corrupt),
    )

    def parked() -> dict[str, str]:
        return {p["document"]: p["reason"] for p in relay.parked()}

    await world.wait_until(lambda: len(parked()) == 2, what="both documents parked")
    assert all("unmapped_building" in why for why in parked().values())
    assert relay.status()["parked"] == relay.parked()
    assert world.sandbox.request_count() == 0
    assert await world.dead_letters() == []
    await world.stop_relay(relay)

    # The operator maps the building and restarts the relay.
    spec.buildings["bat-9"] = "c-9"
    world.sandbox.grant(spec.api_key, "c-9")
    world.write_config()
    relay = await world.start_relay()

    await world.wait_until(
        lambda: good["id"] in world.partner_references("c-9"), what="the parked document sent"
    )
    await world.wait_until(
        lambda: list(parked()) == [corrupt["id"]] and "content_rejected" in parked()[corrupt["id"]],
        what="the refused document parked with its refusal",
    )
    assert world.partner_references("c-9") == {good["id"]: good["content"]["sha256"]}
    assert await world.dead_letters() == []
    assert relay.is_ready()
