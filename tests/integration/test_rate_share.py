"""Replicas share each agency's partner rate: together they never send faster than it allows.

ChouetteCopro limits each agency's API key, whichever replica sends. The sandbox enforces that
rate per key and answers 429 beyond it; two replicas that each sent at the whole rate would be
refused there. Each sends at its share of the input partitions instead.
"""

from __future__ import annotations

import pytest

from consumer.app.relay import Relay
from consumer.local.sandbox import RateLimit as SandboxRate
from tests.fixtures.relay import AgencySpec, WorldFactory, building_on, metric

pytestmark = pytest.mark.integration

AGENCY = "agence-a"
PER_BUILDING = 25


def owned(relay: Relay) -> set[int]:
    return {int(p) for p in relay.status()["partitions"]}


async def test_two_replicas_together_stay_within_the_agency_rate(
    relay_world: WorldFactory,
) -> None:
    buildings = {building_on(AGENCY, 0, 2): "c-0", building_on(AGENCY, 1, 2): "c-1"}
    world = await relay_world(
        agencies={
            AGENCY: AgencySpec(
                buildings=buildings,
                rate_per_second=8.0,
                burst=2,
                # What ChouetteCopro allows the key, with room for one request of network jitter.
                sandbox_rate=SandboxRate(rate_per_s=8.0, burst=3),
            )
        },
        partitions=2,
    )
    first = await world.start_relay()
    second = await world.start_relay()
    await world.wait_until(
        lambda: len(owned(first)) == 1 and len(owned(second)) == 1 and first.is_ready(),
        what="one partition each",
    )
    documents = {
        building: [world.document(title=f"{building} {n}") for n in range(PER_BUILDING)]
        for building in buildings
    }

    await world.publish(
        *(
            world.document_created(AGENCY, building, document)
            for building, batch in documents.items()
            for document in batch
        )
    )

    expected = {
        condominium: {d["id"]: d["content"]["sha256"] for d in documents[building]}
        for building, condominium in buildings.items()
    }

    def all_sent() -> bool:
        return all(world.partner_references(c) == docs for c, docs in expected.items())

    await world.wait_until(
        lambda: all_sent() or world.sandbox.request_count(status=429) > 0,
        timeout=60,
        what="every document on the partner (or a refusal)",
    )
    assert world.sandbox.request_count(status=429) == 0
    assert all_sent()
    assert await metric(first, "chouette_relay_rate_share") == 0.5
    assert await metric(second, "chouette_relay_rate_share") == 0.5
