"""The partner fails during a publication: outages and 429 storms lose nothing and delay only.

Each test publishes a few hundred documents, breaks the sandbox midway (503 for a while, then
429s with Retry-After), and checks what an operator cares about once the partner is back: the
partner holds exactly the published documents (none lost, none duplicated), no request went out
before a Retry-After expired, every input offset is committed, and the metrics told the story.
The sandbox's faults apply to every API key, so isolation between agencies is covered by the
scheduler's unit tests rather than here.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from consumer.app.relay import Relay
from consumer.settings import PartnerSettings
from tests.fixtures.relay import (
    AgencySpec,
    Json,
    RelayWorld,
    WorldFactory,
    metric,
    uncommitted_records,
)

pytestmark = pytest.mark.integration

AGENCY = "agence-a"
BUILDINGS = {"bat-1": "c-1", "bat-2": "c-2", "bat-3": "c-3"}
DOCUMENTS = 300
ISSUE_OUTAGE_SECONDS = 30.0


def uploaded(world: RelayWorld) -> int:
    return len(world.sandbox.documents())


# -- scenario helpers ------------------------------------------------------------------------


async def world_with_one_worker(
    relay_world: WorldFactory, **partner_changes: Any
) -> tuple[RelayWorld, Relay]:
    """One agency, three buildings, and a relay that sends one partner request at a time.

    One worker keeps ``early_request_count`` about the relay's own decisions: with several,
    requests already on the wire when the first Retry-After comes back are counted as early
    too; the test at the end checks several workers against a storm.
    """
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings=dict(BUILDINGS))})
    partner = world.settings().partner
    one_worker = PartnerSettings(**{**partner.model_dump(), "concurrency": 1, **partner_changes})
    relay = await world.start_relay(partner=one_worker)
    return world, relay


def spread_documents(world: RelayWorld, count: int) -> dict[str, list[Json]]:
    """``count`` documents served by the document store, spread over the buildings."""
    by_building: dict[str, list[Json]] = {building: [] for building in BUILDINGS}
    for index in range(count):
        building = list(BUILDINGS)[index % len(BUILDINGS)]
        by_building[building].append(world.document(index=index))
    return by_building


async def assert_published_exactly(
    world: RelayWorld, relay: Relay, by_building: dict[str, list[Json]]
) -> None:
    """The partner holds every document once, in its condominium; nothing is left to do."""
    for building, documents in by_building.items():
        expected = {d["id"]: d["content"]["sha256"] for d in documents}
        assert world.partner_references(BUILDINGS[building]) == expected
    assert uploaded(world) == sum(len(docs) for docs in by_building.values())
    assert world.sandbox.duplicated_references() == {}
    await world.wait_until(
        lambda: _committed(world), timeout=15, what="every input offset committed", interval=0.5
    )
    partitions = relay.status()["partitions"]
    assert all(p["pending_operations"] == 0 for p in partitions.values())
    by_status: dict[str, int] = {}
    for partition in partitions.values():
        for status, count in partition["by_status"].items():
            by_status[status] = by_status.get(status, 0) + count
    assert {status: n for status, n in by_status.items() if n} == {"published": uploaded(world)}


async def _committed(world: RelayWorld) -> bool:
    return await uncommitted_records(world) == 0


# -- tests -----------------------------------------------------------------------------------


async def test_a_30_second_outage_during_a_first_publication_loses_nothing(
    relay_world: WorldFactory,
) -> None:
    world, relay = await world_with_one_worker(relay_world)
    by_building = spread_documents(world, DOCUMENTS)
    manifests = [
        part
        for building, documents in by_building.items()
        for part in world.manifest_parts(AGENCY, building, documents)
    ]

    await world.publish(*manifests)
    await world.wait_until(lambda: uploaded(world) >= 50, what="the publication under way")
    assert uploaded(world) < DOCUMENTS, "the outage must start during the publication"
    world.sandbox.set_faults(outage_seconds=ISSUE_OUTAGE_SECONDS)

    await world.wait_until(
        lambda: uploaded(world) == DOCUMENTS,
        timeout=ISSUE_OUTAGE_SECONDS + 25,
        what="the publication to finish after the outage",
    )

    await assert_published_exactly(world, relay, by_building)
    # The first 503 said when to come back; the relay asked nothing more until then.
    assert world.sandbox.early_request_count() == 0
    assert world.sandbox.request_count(status=503) == 1
    assert (
        await metric(
            relay, "chouette_relay_partner_requests_total", operation="upload", status="503"
        )
        == 1.0
    )
    assert await metric(relay, "chouette_relay_partner_retries_total", reason="retry_after") == 1.0


async def test_errors_open_the_breaker_a_429_storm_only_pauses_and_everything_drains(
    relay_world: WorldFactory,
) -> None:
    world, relay = await world_with_one_worker(relay_world, breaker_cooldown_s=2.0)
    by_building = spread_documents(world, DOCUMENTS)
    events = [
        world.document_created(AGENCY, building, document)
        for building, documents in by_building.items()
        for document in documents
    ]

    async def breaker_state() -> float | None:
        return await metric(relay, "chouette_relay_circuit_open", agency=AGENCY)

    async def breaker_open() -> bool:
        return await breaker_state() == 1.0

    async def breaker_closed() -> bool:
        return await breaker_state() == 0.0

    await world.publish(*events)
    await world.wait_until(lambda: uploaded(world) >= 50, what="the publication under way")
    # Errors without a Retry-After are a health signal: failures in a row open the breaker.
    world.sandbox.set_faults(error_rate=1.0)
    await world.wait_until(breaker_open, timeout=30, what="the breaker to open")
    world.sandbox.clear_faults()
    before = uploaded(world)
    await world.wait_until(
        lambda: uploaded(world) > before + 10, timeout=30, what="uploads after the probe"
    )
    await world.wait_until(breaker_closed, timeout=10, what="the breaker to close again")
    assert uploaded(world) < DOCUMENTS, "the storm must start during the publication"

    # A 429 storm is a rate signal: the agency waits as told, its breaker stays closed.
    world.sandbox.set_faults(storm_seconds=4, storm_retry_after_s=1)
    storm_ends = asyncio.get_running_loop().time() + 4
    while asyncio.get_running_loop().time() < storm_ends:
        assert await breaker_closed(), "a 429 storm opened the breaker"
        await asyncio.sleep(0.2)  # sampling the gauge through the storm, not waiting on it
    await world.wait_until(
        lambda: uploaded(world) == DOCUMENTS, timeout=50, what="the publication to finish"
    )

    await assert_published_exactly(world, relay, by_building)
    assert world.sandbox.early_request_count() == 0
    assert world.sandbox.request_count(status=503) >= 5
    assert world.sandbox.request_count(status=429) >= 1
    assert await breaker_closed()
    waited = await metric(relay, "chouette_relay_partner_retries_total", reason="retry_after")
    assert waited is not None
    assert waited >= 2


async def test_requests_already_preparing_wait_for_a_retry_after(
    relay_world: WorldFactory,
) -> None:
    spec = AgencySpec(buildings={"bat-1": "c-1"}, rate_per_second=20, burst=1)
    world = await relay_world(agencies={AGENCY: spec})
    await world.start_relay()  # eight workers
    documents = [world.document(index=index) for index in range(24)]
    for document in documents:
        # Fetching takes 0.3 s, so several jobs are always between start and request.
        world.store.set_slow(document["content"]["url"].rsplit("/", 1)[1].removesuffix(".pdf"), 0.3)

    await world.publish(*(world.document_created(AGENCY, "bat-1", d) for d in documents))
    await world.wait_until(lambda: uploaded(world) >= 2, what="the first uploads")
    world.sandbox.set_faults(storm_seconds=2, storm_retry_after_s=1)
    await world.wait_until(
        lambda: uploaded(world) == len(documents), timeout=40, what="every upload"
    )

    assert world.partner_references("c-1") == {d["id"]: d["content"]["sha256"] for d in documents}
    assert world.sandbox.duplicated_references() == {}
    assert world.sandbox.early_request_count() == 0
