"""Back-pressure per lane: a first publication's queue never stops a partition's live documents.

Reading a partition pauses when its live work reaches ``KAFKA__MAX_PENDING_LIVE`` or its
first-publication work reaches ``KAFKA__MAX_PENDING_BACKFILL``, and resumes once both are under
half. A backfill is rate-limited and may last hours: counted against the live bound, it would
stop every other building of the partition for as long. Real broker, real sandbox.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from consumer.app.relay import Relay
from consumer.settings import KafkaSettings
from tests.fixtures.relay import AgencySpec, RelayWorld, WorldFactory
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
