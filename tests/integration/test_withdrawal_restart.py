"""A withdrawal done before a restart stays done: the input read again never publishes it twice.

A manifest's "applied" record becomes durable only once the building's work it counted on is
finished, while each withdrawal is durable as soon as the partner acknowledged it. A relay stopped
between the two reads the building's manifests again from the last commit; the earlier one, which
still lists the withdrawn document, must not upload it a second time.
"""

from __future__ import annotations

import datetime as dt

import pytest

from tests.fixtures.relay import AgencySpec, RelayWorld, WorldFactory, uncommitted_records

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
