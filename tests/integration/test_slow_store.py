"""One agency's slow document store holds back only that agency's documents.

Content is fetched before a job takes one of the ``PARTNER__CONCURRENCY`` partner slots: with
every slot's worth of agency A's downloads hanging on its store, agency B's document still goes
to ChouetteCopro at once, and A's arrive once its store answers.
"""

from __future__ import annotations

import pytest

from tests.fixtures.relay import AgencySpec, Json, WorldFactory

pytestmark = pytest.mark.integration

SLOW_CHUNK_S = 15.0
"""How long agency A's store waits before each document's body: longer than B may take."""


def store_name(document: Json) -> str:
    url: str = document["content"]["url"]
    return url.rsplit("/", 1)[1].removesuffix(".pdf")


async def test_a_slow_store_of_one_agency_never_delays_another_agencys_document(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(
        agencies={
            "agence-a": AgencySpec(buildings={"bat-a": "c-a"}),
            "agence-b": AgencySpec(buildings={"bat-b": "c-b"}),
        }
    )
    relay = await world.start_relay()
    concurrency = relay.settings.partner.concurrency
    slow = [world.document(title=f"Contrat {n}") for n in range(concurrency)]
    for document in slow:
        world.store.set_slow(store_name(document), SLOW_CHUNK_S)
    await world.publish(*(world.document_created("agence-a", "bat-a", d) for d in slow))
    await world.wait_until(
        lambda: all(world.store.request_count(store_name(d)) == 1 for d in slow),
        what=f"agency A's {concurrency} downloads under way",
    )

    urgent = world.document(title="Convocation AG")
    await world.publish(world.document_created("agence-b", "bat-b", urgent))
    await world.wait_until(
        lambda: urgent["id"] in world.partner_references("c-b"),
        timeout=SLOW_CHUNK_S / 2,
        what="agency B's document at ChouetteCopro while agency A's store is still answering",
    )
    assert world.partner_references("c-a") == {}  # A's downloads were all still under way

    await world.wait_until(
        lambda: len(world.partner_references("c-a")) == concurrency,
        timeout=SLOW_CHUNK_S * 4,
        what="agency A's documents, once its store answered",
    )
    assert all(world.store.request_count(store_name(d)) == 1 for d in slow)  # each fetched once
