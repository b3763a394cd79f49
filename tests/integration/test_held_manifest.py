"""A held manifest decides its whole building, whatever the timing and whatever crashes.

While the mass-deletion guard holds a building's complete manifest, the documents it would
withdraw or keep unpublished wait: uploads still queued when the hold begins are not sent, and
live documents created before the manifest was taken (and not in it) wait too, even when the
relay is killed and reads them only after a restart. ``held`` shows both kinds with counts. A
release ends the building as if the manifest had been applied when it arrived; a discard as if it
had never come.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from consumer.app.relay import Relay
from tests.fixtures.relay import AgencySpec, Json, RelayWorld, WorldFactory
from tests.integration.operator_helpers import cli

pytestmark = pytest.mark.integration

AGENCY, BUILDING, CONDOMINIUM = "agence-a", "bat-1", "c-1"


def _idle(relay: Relay) -> bool:
    return all(p["pending_operations"] == 0 for p in relay.status()["partitions"].values())


def _waiting(relay: Relay) -> tuple[int, int] | None:
    """The building's held withdrawals and waiting uploads, as ``held`` shows them."""
    for entry in relay.held():
        if (entry["agency"], entry["building"]) == (AGENCY, BUILDING):
            return entry["withdrawals"], entry["uploads"]
    return None


async def _held_in_state_topic(world: RelayWorld) -> dict[str, Any] | None:
    """The building's entry of ``chouette-relay held`` (read from the state topic)."""
    for entry in (await cli(world, "held"))["held"]:
        if (entry["agency"], entry["building"]) == (AGENCY, BUILDING):
            return dict(entry)
    return None


def _created(world: RelayWorld, documents: list[Json], occurred_at: dt.datetime) -> list[Json]:
    return [world.document_created(AGENCY, BUILDING, d, occurred_at=occurred_at) for d in documents]


async def test_uploads_still_queued_when_the_hold_begins_wait_and_a_release_leaves_the_manifest(
    relay_world: WorldFactory,
) -> None:
    # A partner slow for this agency: two uploads a second, so most are queued when the
    # building's empty complete manifest arrives.
    spec = AgencySpec(buildings={BUILDING: CONDOMINIUM}, rate_per_second=2.0, burst=1)
    world = await relay_world(agencies={AGENCY: spec}, partitions=1)
    manual = world.sandbox.seed_manual_document(CONDOMINIUM, "Plan des caves, posé à la main")
    relay = await world.start_relay()
    created_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    documents = [world.document() for _ in range(30)]
    await world.publish(*_created(world, documents, created_at))
    await world.wait_until(
        lambda: len(world.partner_references(CONDOMINIUM)) >= 3, what="the first uploads"
    )

    # LSC's export of the building is empty: the guard holds it.
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    await world.publish(*world.manifest_parts(AGENCY, BUILDING, [], taken_at=taken_at))
    await world.wait_until(
        lambda: sum(_waiting(relay) or ()) == len(documents) and _idle(relay),
        timeout=60,
        what="every document of the building waiting for the decision",
    )
    withdrawals, uploads = _waiting(relay) or (0, 0)
    assert uploads > 0, "the partner was fast enough to take every upload before the hold"
    assert len(world.partner_references(CONDOMINIUM)) == withdrawals  # sent before the hold
    assert world.sandbox.request_count("DELETE") == 0
    listed = await _held_in_state_topic(world)
    assert listed is not None
    assert (listed["documents"], listed["withdrawals"], listed["uploads"]) == (
        len(documents),
        withdrawals,
        uploads,
    )

    assert (await cli(world, "release", AGENCY, BUILDING))["queued"] == "release"
    await world.wait_until(
        lambda: relay.held() == [] and _idle(relay), timeout=60, what="the release"
    )

    # As if the empty manifest had been applied when it arrived: none of the relay's documents,
    # and the one made by hand untouched.
    assert world.partner_references(CONDOMINIUM) == {}
    assert world.sandbox.document(manual) is not None
    assert world.sandbox.request_count("DELETE", 204) == withdrawals
    assert sum(world.sandbox.create_count(d["id"]) for d in documents) == withdrawals


async def test_live_documents_read_after_a_crash_behind_the_held_manifest_are_sent_on_discard(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={BUILDING: CONDOMINIUM})})
    published = [world.document() for _ in range(4)]
    early = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
    relay = await world.start_relay()
    await world.publish(*_created(world, published, early))
    await world.wait_until(
        lambda: (
            set(world.partner_references(CONDOMINIUM)) == {d["id"] for d in published}
            and _idle(relay)
        ),
        timeout=60,
        what="the building's documents on the partner",
    )
    await world.stop_relay(relay)

    process = world.spawn_relay(world.tmp / "relay.log")
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    await world.publish(*world.manifest_parts(AGENCY, BUILDING, [], taken_at=taken_at))

    async def held() -> bool:
        listed = await _held_in_state_topic(world)
        return listed is not None and listed["withdrawals"] == len(published)

    await world.wait_until(held, timeout=60, what="the hold in the state topic")
    world.kill(process)

    # Created before the manifest was taken, read only by the next relay: they wait with it.
    later = [world.document() for _ in range(3)]
    before_snapshot = taken_at - dt.timedelta(minutes=30)
    await world.publish(*_created(world, later, before_snapshot))
    relay = await world.start_relay()
    await world.wait_until(
        lambda: _waiting(relay) == (len(published), len(later)) and _idle(relay),
        timeout=60,
        what="the live documents waiting with the held manifest",
    )
    assert {d["id"] for d in later}.isdisjoint(world.partner_references(CONDOMINIUM))

    assert (await cli(world, "discard", AGENCY, BUILDING))["queued"] == "discard"
    await world.wait_until(
        lambda: relay.held() == [] and _idle(relay), timeout=60, what="the discard"
    )

    # As if the manifest had never come: everything LSC published is on the partner, once.
    everything = published + later
    assert world.partner_references(CONDOMINIUM) == {
        d["id"]: d["content"]["sha256"] for d in everything
    }
    assert all(world.sandbox.create_count(d["id"]) == 1 for d in everything)
    assert world.sandbox.request_count("DELETE") == 0
