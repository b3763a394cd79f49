"""Static group membership: kept across a restart in place, given up on a clean stop.

With ``KAFKA__GROUP_INSTANCE_ID`` (the pod name by default) a relay that stops cleanly leaves the
group by its instance id, so that its partitions move at once (the next pod of a Deployment has
another name). With ``KAFKA__LEAVE_GROUP_ON_STOP=false`` it stays a member, and a relay that comes
back with the same id within the session timeout takes over its partitions without a rebalance:
the other replicas keep theirs, and restore nothing again.
"""

from __future__ import annotations

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from consumer.app.relay import Relay
from consumer.settings import KafkaSettings
from tests.fixtures.relay import AgencySpec, RelayWorld, WorldFactory, building_on, metric

pytestmark = pytest.mark.integration

AGENCY = "agence-a"


def static(world: RelayWorld, instance: str, *, leave: bool = True) -> KafkaSettings:
    # A session long enough for the restart below, even on a busy machine.
    return world.settings().kafka.model_copy(
        update={
            "group_instance_id": instance,
            "session_timeout_ms": 45_000,
            "leave_group_on_stop": leave,
        }
    )


async def group_members(kafka: KafkaSettings) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        (described,) = await admin.describe_consumer_groups([kafka.group_id])
    finally:
        await admin.close()
    (group,) = described.groups
    return len(group[5])  # (error_code, group, state, protocol_type, protocol, members)


def owned(relay: Relay) -> set[int]:
    return {int(p) for p in relay.status()["partitions"]}


async def forward_one(world: RelayWorld, building: str) -> None:
    document = world.document()
    await world.publish(world.document_created(AGENCY, building, document))
    condominium = world.agencies[AGENCY].buildings[building]
    await world.wait_until(
        lambda: document["id"] in world.partner_references(condominium), what="the upload"
    )


async def test_a_restarted_static_member_takes_its_partition_back_without_a_rebalance(
    relay_world: WorldFactory,
) -> None:
    buildings = {building_on(AGENCY, 0, 2): "c-0", building_on(AGENCY, 1, 2): "c-1"}
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings=buildings)}, partitions=2)
    first = await world.start_relay(kafka=static(world, "relay-a", leave=False))
    second = await world.start_relay(kafka=static(world, "relay-b", leave=False))
    await world.wait_until(
        lambda: len(owned(first)) == 1 and len(owned(second)) == 1 and first.is_ready(),
        what="one partition each",
    )
    (kept,) = owned(second)
    for building in buildings:
        await forward_one(world, building)
    restored_before = await metric(second, "chouette_relay_restore_records_total")

    await world.stop_relay(first)
    assert await group_members(static(world, "relay-a")) == 2  # relay-a waits to come back
    restarted = await world.start_relay(kafka=static(world, "relay-a", leave=False))

    assert owned(restarted) == {1 - kept}
    for building in buildings:
        await forward_one(world, building)
    assert owned(second) == {kept}
    # A rebalance would have revoked and restored the other replica's partition again.
    assert await metric(second, "chouette_relay_restore_records_total") == restored_before


async def test_a_cleanly_stopped_static_member_leaves_and_its_partition_moves_at_once(
    relay_world: WorldFactory,
) -> None:
    buildings = {building_on(AGENCY, 0, 2): "c-0", building_on(AGENCY, 1, 2): "c-1"}
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings=buildings)}, partitions=2)
    first = await world.start_relay(kafka=static(world, "relay-a"))
    second = await world.start_relay(kafka=static(world, "relay-b"))
    await world.wait_until(
        lambda: len(owned(first)) == 1 and len(owned(second)) == 1 and first.is_ready(),
        what="one partition each",
    )

    await world.stop_relay(first)

    # Gone from the group at once, not after the 45 s session timeout: the rebalance starts now.
    assert await group_members(static(world, "relay-b")) == 1
    await world.wait_until(lambda: owned(second) == {0, 1}, what="both partitions on relay-b")
    for building in buildings:
        await forward_one(world, building)
