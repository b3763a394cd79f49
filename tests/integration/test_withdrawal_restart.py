"""A withdrawal done before a restart stays done: the input read again never publishes it twice.

A manifest's "applied" record becomes durable only once the building's work it counted on is
finished, while each withdrawal is durable as soon as the partner acknowledged it. A relay stopped
between the two reads the building's manifests again from the last commit; the earlier one, which
still lists the withdrawn document, must not upload it a second time.
"""

from __future__ import annotations

import datetime as dt

import pytest

from tests.fixtures.relay import (
    AgencySpec,
    RelayWorld,
    WorldFactory,
    metric,
    uncommitted_records,
)

pytestmark = pytest.mark.integration

AGENCY, BUILDING, CONDOMINIUM = "agence-a", "bat-1", "c-1"


async def test_a_document_withdrawn_before_a_restart_is_not_uploaded_again(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(
        agencies={AGENCY: AgencySpec(buildings={BUILDING: CONDOMINIUM})}, partitions=1
    )
    keep = [world.document(inline=True) for _ in range(4)]
    gone = world.document(inline=True)
    # Its content comes slowly: the building's work, and so both manifests' records, wait.
    slow = world.document()
    slow_name = slow["content"]["url"].rsplit("/", 1)[-1].removesuffix(".pdf")
    world.store.set_slow(slow_name, 60.0)
    now = dt.datetime.now(dt.UTC)
    first = world.manifest_parts(
        AGENCY, BUILDING, [*keep, gone, slow], taken_at=now - dt.timedelta(minutes=2)
    )
    second = world.manifest_parts(
        AGENCY, BUILDING, [*keep, slow], taken_at=now - dt.timedelta(minutes=1)
    )

    relay = await world.start_relay(drain_timeout_s=0.5)
    await world.publish(*first)
    await world.wait_until(lambda: gone["id"] in world.partner_references(), what="the upload")
    await world.publish(*second)
    await world.wait_until(
        lambda: gone["id"] not in world.partner_references(), what="the withdrawal"
    )
    await world.stop_relay(relay)  # the slow upload is still running: stopped, not finished
    assert slow["id"] not in world.partner_references()

    world.store.set_slow(slow_name, 0.0)
    await world.start_relay()
    await world.wait_until(lambda: _at_end(world), timeout=60, what="every input record committed")
    expected = {d["id"]: d["content"]["sha256"] for d in [*keep, slow]}
    assert world.partner_references(CONDOMINIUM) == expected
    assert world.sandbox.create_count(gone["id"]) == 1, "the withdrawn document was sent again"
    assert world.sandbox.duplicated_references() == {}


async def _at_end(world: RelayWorld) -> bool:
    return await uncommitted_records(world) == 0


@pytest.mark.parametrize("withdrawn_by", ["event", "manifest"])
async def test_a_withdrawal_still_waiting_for_the_partner_is_not_forgotten_by_a_later_manifest(
    relay_world: WorldFactory, withdrawn_by: str
) -> None:
    # A withdrawal waits for the partner (away); meanwhile a newer manifest leaves the document
    # out, and the relay is stopped before the partner is back. The withdrawal must still happen.
    world = await relay_world(
        agencies={AGENCY: AgencySpec(buildings={BUILDING: CONDOMINIUM})}, partitions=1
    )
    keep = [world.document(inline=True) for _ in range(4)]
    gone = world.document(inline=True)
    now = dt.datetime.now(dt.UTC)
    relay = await world.start_relay(drain_timeout_s=0.5)
    await world.publish(
        *world.manifest_parts(
            AGENCY, BUILDING, [*keep, gone], taken_at=now - dt.timedelta(minutes=3)
        )
    )
    await world.wait_until(lambda: gone["id"] in world.partner_references(), what="the upload")

    # The partner answers 429 until the faults are cleared, asking for a second each time.
    world.sandbox.set_faults(storm_seconds=600, storm_retry_after_s=1)
    if withdrawn_by == "event":  # its audience became owners: never forwarded again
        owners = {**gone, "audience": "individual"}
        taken = now - dt.timedelta(minutes=2)
        await world.publish(world.document_created(AGENCY, BUILDING, owners, occurred_at=taken))
    else:
        await world.publish(
            *world.manifest_parts(AGENCY, BUILDING, keep, taken_at=now - dt.timedelta(minutes=2))
        )
    await world.wait_until(
        lambda: world.sandbox.request_count("DELETE") > 0, what="the withdrawal put off"
    )
    await world.publish(
        *world.manifest_parts(AGENCY, BUILDING, keep, taken_at=now - dt.timedelta(minutes=1))
    )
    applied = 2 if withdrawn_by == "event" else 3

    async def newer_applied() -> bool:
        kind = {"kind": "manifest-snapshot", "outcome": "applied"}
        return await metric(relay, "chouette_relay_events_total", **kind) == applied

    await world.wait_until(newer_applied, what="the newer manifest applied")
    await world.stop_relay(relay)
    assert gone["id"] in world.partner_references()

    world.sandbox.clear_faults()
    await world.start_relay()
    await world.wait_until(lambda: _at_end(world), timeout=60, what="every input record committed")
    assert world.partner_references(CONDOMINIUM) == {d["id"]: d["content"]["sha256"] for d in keep}
