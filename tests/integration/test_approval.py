"""A first publication that sends history waits for an operator who read its plan.

An agency whose mode sends history (``history``, ``since:``) and whose routing does not say
``approval = "auto"`` sends none of its backfill until an operator approves the plan's
fingerprint; its live documents flow meanwhile, and ``fresh`` needs no approval. An approval is
refused once the plan it was given for has changed (a new manifest arrived); the fingerprint of
the current plan starts it, and every document is then sent once.
"""

from __future__ import annotations

import datetime as dt
import re

import pytest

from consumer.app.relay import Relay
from tests.fixtures.relay import AgencySpec, Json, RelayWorld, WorldFactory, metric
from tests.integration.operator_helpers import call, cli, cli_output, token_http

pytestmark = pytest.mark.integration

NEW, FRESH = "agence-neuve", "agence-fraiche"


def _references(documents: list[Json]) -> dict[str, str]:
    return {d["id"]: d["content"]["sha256"] for d in documents}


async def _manifest(world: RelayWorld, agency: str, building: str, count: int) -> list[Json]:
    documents = [world.document() for _ in range(count)]
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    await world.publish(*world.manifest_parts(agency, building, documents, taken_at=taken_at))
    return documents


def _awaiting(relay: Relay) -> dict[str, list[str]]:
    awaiting: dict[str, list[str]] = relay.status()["awaiting_approval"]
    return awaiting


async def test_an_approval_is_refused_once_the_plan_changed_and_the_current_one_starts_it(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(
        agencies={
            NEW: AgencySpec(buildings={"bat-1": "c-1", "bat-2": "c-2"}, approval="operator"),
            FRESH: AgencySpec(
                buildings={"bat-9": "c-9"}, first_publication="fresh", approval="operator"
            ),
        }
    )
    relay = await world.start_relay(http=token_http(world.tmp))
    first = await _manifest(world, NEW, "bat-1", 4)
    baseline = await _manifest(world, FRESH, "bat-9", 3)
    live = world.document()
    await world.publish(world.document_created(NEW, "bat-1", live))

    await world.wait_until(lambda: _awaiting(relay) == {NEW: ["bat-1"]}, what="bat-1 waiting")
    await world.wait_until(
        lambda: world.partner_references("c-1") == _references([live]), what="the live document"
    )

    async def gauge_shows_it() -> bool:
        gauge = "chouette_relay_first_publication_awaiting_approval_buildings"
        return await metric(relay, gauge, agency=NEW) == 1.0

    await world.wait_until(gauge_shows_it, what="the awaiting gauge", timeout=10)
    shown = await cli(world, "plan", "--agency", NEW, "--json")
    assert shown["uploads"] == 4
    old_plan = shown["fingerprints"][NEW]
    text, _ = await cli_output(world, "plan", "--agency", NEW)
    assert f"chouette-relay approve {NEW} --plan {old_plan}" in text
    # Any pod's status says why nothing goes, not a time left at the agency's rate.
    text, _ = await cli_output(world, "status", "--agency", NEW)
    assert f"waits for approval (chouette-relay plan --agency {NEW})" in text
    assert " left at " not in text

    second = await _manifest(world, NEW, "bat-2", 2)  # the plan changes
    await world.wait_until(
        lambda: _awaiting(relay) == {NEW: ["bat-1", "bat-2"]}, what="bat-2 waiting too"
    )

    _, refusal = await cli_output(world, "approve", NEW, "--plan", old_plan, expect=2)
    assert f"{old_plan} does not match the plan of {NEW}" in refusal
    assert "changed since" not in refusal
    # What would be approved is read before the fingerprint to copy, and agrees with the plan.
    summary, _, to_copy = refusal.partition("to approve that plan")
    shown_now, _ = await cli_output(world, "plan", "--agency", NEW)
    uploads = re.search(rf"^{NEW}: (\d+ uploads) ", shown_now, re.MULTILINE)
    assert uploads is not None
    assert f"which is now {uploads[1]} " in summary
    assert f"chouette-relay approve {NEW} --plan " in to_copy
    status, body = await call(
        relay, "POST", f"/admin/agencies/{NEW}/approve", token=True, body={"plan": old_plan}
    )
    assert status == 409
    assert world.partner_references("c-1") == _references([live])
    assert world.partner_references("c-2") == {}
    assert relay.status()["partitions"]  # still running, nothing sent

    status, body = await call(relay, "GET", f"/admin/plan?agency={NEW}", token=True)
    assert (status, body["uploads"]) == (200, 6)
    new_plan = body["fingerprints"][NEW]
    assert new_plan != old_plan
    status, queued = await call(
        relay, "POST", f"/admin/agencies/{NEW}/approve", token=True, body={"plan": new_plan}
    )
    assert (status, queued["plan"]) == (202, new_plan)

    await world.wait_until(
        lambda: (
            world.partner_references("c-1") == _references([*first, live])
            and world.partner_references("c-2") == _references(second)
        ),
        what="the approved first publication",
    )
    await world.wait_until(lambda: _awaiting(relay) == {}, what="nothing waiting")
    approved = await cli(world, "status", "--json")
    assert (approved[NEW]["unapproved"], approved[FRESH]["unapproved"]) == (False, False)
    assert world.sandbox.duplicated_references() == {}
    assert world.partner_references("c-9") == {}  # fresh: recorded as baseline, never waited
    assert not any(d["id"] in world.partner_references() for d in baseline)
