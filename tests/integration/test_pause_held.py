"""A paused agency's work is held, not pending: it neither stalls its partition nor a shutdown.

A first publication paused mid-way leaves tens of thousands of operations waiting. They wait as
queued items with their offsets uncommitted, but count neither toward the partition's
back-pressure (its first-publication bound, ``KAFKA__MAX_PENDING_BACKFILL``, made small here), so
the agencies sharing the partition keep flowing, nor toward the drain of a shutdown, which would
otherwise wait its whole timeout for work that cannot run. After a restart the held work is read
again and waits again.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from consumer.app.relay import Relay
from consumer.settings import KafkaSettings
from tests.fixtures.relay import AgencySpec, RelayWorld, WorldFactory
from tests.integration.operator_helpers import cli, live_document_sent, many_documents

pytestmark = pytest.mark.integration

PAUSED, OTHER = "agence-a", "agence-b"
BACKPRESSURE = 1_000  # the pending first-publication operations that stop reading a partition


def _partition(relay: Relay) -> dict[str, Any]:
    [only] = relay.status()["partitions"].values()
    return dict(only)


def _agencies() -> dict[str, AgencySpec]:
    return {
        PAUSED: AgencySpec(buildings={"bat-1": "c-1", "bat-2": "c-2"}),
        OTHER: AgencySpec(buildings={"bat-9": "c-9"}),
    }


async def _pause(world: RelayWorld, relay: Relay) -> None:
    assert (await cli(world, "pause", PAUSED))["queued"] == "pause"
    await world.wait_until(lambda: relay.status()["paused"] == [PAUSED], what="the pause")


async def test_a_paused_first_publication_does_not_stall_the_other_agencies_of_its_partition(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies=_agencies(), partitions=1)
    kafka = world.settings().kafka.model_dump()
    relay = await world.start_relay(
        kafka=KafkaSettings(**{**kafka, "max_pending_backfill": BACKPRESSURE})
    )
    await _pause(world, relay)

    listed = many_documents(world, BACKPRESSURE + 500)
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    await world.publish(*world.manifest_parts(PAUSED, "bat-1", listed, taken_at=taken_at, parts=30))
    await world.wait_until(
        lambda: _partition(relay)["held_operations"] == len(listed),
        timeout=120,
        what="the paused first publication planned and held",
    )

    await live_document_sent(
        world, OTHER, "bat-9", "c-9", within=60, what="a document past the paused backlog"
    )
    # Its published record written, nothing of the other agency is pending any more.
    await world.wait_until(lambda: _partition(relay)["pending_operations"] == 0, what="idle")
    assert world.partner_references("c-1") == {}
    partition = _partition(relay)
    assert partition["held_operations"] == len(listed)
    assert partition["committable"][world.manifests_topic] == 0  # held for the paused agency


async def test_a_shutdown_does_not_wait_for_paused_work_which_is_read_again_after_restart(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies=_agencies(), partitions=1)
    # A drain timeout far longer than the test allows: waiting for the paused work would hang.
    relay = await world.start_relay(drain_timeout_s=3600.0)
    await _pause(world, relay)
    waiting = world.document()
    await world.publish(world.document_created(PAUSED, "bat-2", waiting))
    flowing = world.document()
    await world.publish(world.document_created(OTHER, "bat-9", flowing))
    await world.wait_until(lambda: _partition(relay)["held_operations"] == 1, what="held")
    await world.wait_until(lambda: flowing["id"] in world.partner_references("c-9"), what="sent")

    await world.stop_relay(relay)  # what SIGTERM starts; the fixture gives it 60 s

    relay = await world.start_relay(drain_timeout_s=3600.0)
    await world.wait_until(
        lambda: _partition(relay)["held_operations"] == 1, what="the held document read again"
    )
    assert world.partner_references("c-2") == {}
    assert (await cli(world, "resume", PAUSED))["queued"] == "resume"
    await world.wait_until(
        lambda: waiting["id"] in world.partner_references("c-2"), what="the resumed document"
    )
    assert world.sandbox.create_count(waiting["id"]) == 1
    assert world.sandbox.create_count(flowing["id"]) == 1
