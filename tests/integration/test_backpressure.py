"""Back-pressure per lane: a first publication's queue never stops a partition's live documents.

Reading a partition pauses when its live work reaches ``KAFKA__MAX_PENDING_LIVE`` or its
first-publication work reaches ``KAFKA__MAX_PENDING_BACKFILL``, and resumes once both are under
half; while the whole replica's work reaches ``KAFKA__MAX_PENDING_TOTAL``, the partitions that
hold some pause too, and the others keep reading. A backfill is rate-limited and may last hours:
counted against the live bound, it would stop every other building of the partition for as long.
Real broker, real sandbox.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from consumer.app.relay import Relay
from consumer.settings import KafkaSettings
from tests.fixtures.relay import AgencySpec, RelayWorld, WorldFactory, building_on
from tests.integration.operator_helpers import live_document_sent, many_documents

pytestmark = pytest.mark.integration

ONBOARDING, OTHER = "agence-a", "agence-b"
HISTORY = 200


def _partition(relay: Relay) -> dict[str, Any]:
    [only] = relay.status()["partitions"].values()
    return dict(only)


async def _start(world: RelayWorld, *, live: int, backfill: int) -> Relay:
    kafka = world.settings().kafka.model_dump()
    bounds = {"max_pending_live": live, "max_pending_backfill": backfill}
    return await world.start_relay(kafka=KafkaSettings(**{**kafka, **bounds}))


async def _onboard(world: RelayWorld, relay: Relay) -> None:
    """A first publication of ``HISTORY`` documents, all planned and queued."""
    listed = many_documents(world, HISTORY)
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    await world.publish(*world.manifest_parts(ONBOARDING, "bat-1", listed, taken_at=taken_at))
    await world.wait_until(
        lambda: _partition(relay)["pending_by_lane"]["backfill"] > HISTORY // 2,
        what="the first publication queued",
    )


def _agencies() -> dict[str, AgencySpec]:
    return {
        # 10 documents a second: the first publication lasts about 20 s.
        ONBOARDING: AgencySpec(buildings={"bat-1": "c-1"}, rate_per_second=10.0, burst=1),
        OTHER: AgencySpec(buildings={"bat-9": "c-9"}),
    }


async def test_a_first_publication_queue_does_not_stop_the_live_documents_of_its_partition(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies=_agencies(), partitions=1)
    # Far more backfill queued than the live bound allows live work.
    relay = await _start(world, live=20, backfill=10_000)
    await _onboard(world, relay)

    await live_document_sent(
        world, OTHER, "bat-9", "c-9", within=10, what="a live document during the backfill"
    )
    assert len(world.partner_references("c-1")) < HISTORY // 2, "the backfill was already over"
    assert not _partition(relay)["reading_paused"]


async def test_reading_pauses_at_the_backfill_bound_and_resumes_under_half_of_it(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies=_agencies(), partitions=1)
    relay = await _start(world, live=20_000, backfill=HISTORY // 2)
    await _onboard(world, relay)
    await world.wait_until(lambda: _partition(relay)["reading_paused"], what="reading paused")

    await live_document_sent(
        world, OTHER, "bat-9", "c-9", within=60, what="a live document, the backfill under half"
    )
    # Not read before the queued backfill fell under half the bound (HISTORY // 4).
    assert len(world.partner_references("c-1")) >= HISTORY - HISTORY // 4 - 1
    await world.wait_until(lambda: not _partition(relay)["reading_paused"], what="reading again")


async def test_the_replica_budget_pauses_the_partitions_holding_work_and_spares_the_others(
    relay_world: WorldFactory,
) -> None:
    # The first publication's building on partition 0, the other agency's on partition 1.
    onboarding, other = building_on(ONBOARDING, 0, 2), building_on(OTHER, 1, 2)
    world = await relay_world(
        agencies={
            ONBOARDING: AgencySpec(buildings={onboarding: "c-1"}, rate_per_second=10.0, burst=1),
            OTHER: AgencySpec(buildings={other: "c-9"}),
        },
        partitions=2,
    )
    kafka = world.settings().kafka.model_dump()
    # Each lane's bound far away: only the replica's budget can pause.
    bounds = {"max_pending_live": 20_000, "max_pending_backfill": 20_000}
    relay = await world.start_relay(
        kafka=KafkaSettings(**{**kafka, **bounds, "max_pending_total": HISTORY // 2})
    )
    listed = many_documents(world, HISTORY)
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    await world.publish(*world.manifest_parts(ONBOARDING, onboarding, listed, taken_at=taken_at))

    def partitions() -> dict[str, Any]:
        return dict(relay.status()["partitions"])

    await world.wait_until(lambda: partitions()["0"]["reading_paused"], what="partition 0 paused")
    assert relay.status()["over_budget"]

    await live_document_sent(
        world, OTHER, other, "c-9", within=10, what="a live document of the partition with none"
    )
    await world.wait_until(
        lambda: not partitions()["1"]["reading_paused"], what="partition 1 read, its work done"
    )
    assert partitions()["0"]["reading_paused"]
    await world.wait_until(
        lambda: not partitions()["0"]["reading_paused"], timeout=60, what="under half: reading"
    )
    assert len(world.partner_references("c-1")) >= HISTORY // 2
