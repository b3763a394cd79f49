"""The planned total of a first publication is known from its first manifest, approval or not.

The dashboard charts the documents on the partner of those planned
(``chouette_relay_first_publication_planned_documents``). A first publication that awaits an
operator's approval keeps its manifests aside; what they would upload counts as planned already,
so the total the progress is measured against does not jump when the operator approves.
"""

from __future__ import annotations

import datetime as dt

import pytest

from consumer.app.relay import Relay
from tests.fixtures.relay import AgencySpec, Json, WorldFactory, metric
from tests.integration.operator_helpers import cli, token_http

pytestmark = pytest.mark.integration

AGENCY = "agence-neuve"
BUILDINGS = {"bat-1": "c-1", "bat-2": "c-2"}


def _references(documents: list[Json]) -> dict[str, str]:
    return {d["id"]: d["content"]["sha256"] for d in documents}


def _idle(relay: Relay) -> bool:
    return all(p["pending_operations"] == 0 for p in relay.status()["partitions"].values())


async def _progress(relay: Relay) -> tuple[float | None, float | None]:
    """The gauges' documents on the partner, and planned."""
    done = await metric(relay, "chouette_relay_first_publication_done_documents", agency=AGENCY)
    planned = await metric(
        relay, "chouette_relay_first_publication_planned_documents", agency=AGENCY
    )
    return done, planned


async def test_the_planned_total_counts_manifests_awaiting_approval_and_holds_once_approved(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(
        agencies={AGENCY: AgencySpec(buildings=BUILDINGS, approval="operator")}
    )
    relay = await world.start_relay(http=token_http(world.tmp))
    live = world.document()
    await world.publish(world.document_created(AGENCY, "bat-1", live))
    await world.wait_until(
        lambda: world.partner_references("c-1") == _references([live]), what="the live document"
    )
    history: dict[str, list[Json]] = {b: [world.document() for _ in range(6)] for b in BUILDINGS}
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    for building, documents in history.items():
        # The manifest lists the live document too: it is on the partner, not planned twice.
        listed = [live, *documents] if building == "bat-1" else documents
        await world.publish(*world.manifest_parts(AGENCY, building, listed, taken_at=taken_at))
    await world.wait_until(
        lambda: relay.status()["awaiting_approval"] == {AGENCY: sorted(BUILDINGS)},
        what="both buildings awaiting approval",
    )

    async def planned_before_approval() -> bool:
        return await _progress(relay) == (1.0, 13.0)

    await world.wait_until(planned_before_approval, timeout=10, what="1 done of 13 planned")

    plan = (await cli(world, "plan", "--agency", AGENCY, "--json"))["fingerprints"][AGENCY]
    await cli(world, "approve", AGENCY, "--plan", plan)
    everything = [live, *history["bat-1"], *history["bat-2"]]
    await world.wait_until(
        lambda: (
            {**world.partner_references("c-1"), **world.partner_references("c-2")}
            == _references(everything)
            and _idle(relay)
        ),
        timeout=60,
        what="the first publication done",
    )

    async def all_done() -> bool:
        return await _progress(relay) == (13.0, 13.0)

    await world.wait_until(all_done, timeout=10, what="13 done of the same 13 planned")
