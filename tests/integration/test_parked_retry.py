"""Parked documents across the cluster, and sending them again after a fix without a restart.

A document the partner refuses for lack of rights is parked with the partner's reason. The
operator lists parked documents from any pod (every partition of the state topic is read), fixes
the cause on the partner's side and retries one building, then the whole agency: each document is
sent once, and nothing of another building moves before its retry.
"""

from __future__ import annotations

import pytest

from consumer.app.relay import Relay
from tests.fixtures.relay import AgencySpec, Json, WorldFactory
from tests.integration.operator_helpers import call, cli, cli_output, cli_terminal, token_http

pytestmark = pytest.mark.integration

AGENCY = "agence-a"


def _parked(relay: Relay) -> dict[str, str]:
    return {p["document"]: p["building"] for p in relay.parked()}


def _idle(relay: Relay) -> bool:
    return all(p["pending_operations"] == 0 for p in relay.status()["partitions"].values())


async def test_parked_documents_are_listed_and_retried_per_building_then_per_agency(
    relay_world: WorldFactory,
) -> None:
    spec = AgencySpec(buildings={"bat-1": "c-1"})
    world = await relay_world(agencies={AGENCY: spec})
    # The routing maps two more buildings, but the agency's key has no right on them yet.
    spec.buildings |= {"bat-2": "c-2", "bat-3": "c-3"}
    world.write_config()
    relay = await world.start_relay(http=token_http(world.tmp))
    documents: dict[str, list[Json]] = {
        b: [world.document() for _ in range(3)] for b in spec.buildings
    }
    for building, docs in documents.items():
        await world.publish(*(world.document_created(AGENCY, building, d) for d in docs))

    await world.wait_until(lambda: len(_parked(relay)) == 6 and _idle(relay), what="6 parked")
    listed = (await cli(world, "parked", "--agency", AGENCY))["parked"]
    assert {(p["building"], p["document"]) for p in listed} == {
        (b, d["id"]) for b in ("bat-2", "bat-3") for d in documents[b]
    }
    assert all(p["reason"].startswith("partner_refused: ") for p in listed), listed
    assert all(p["title"].startswith("Document") for p in listed)
    # On a terminal: a line per document, with the reason it waits.
    shown = await cli_terminal(world, "parked", "--agency", AGENCY)
    rows = [line for line in shown.splitlines() if line.startswith(f"{AGENCY} ")]
    assert sorted(row.split()[1] for row in rows) == ["bat-2"] * 3 + ["bat-3"] * 3
    assert all("partner_refused: " in row for row in rows)
    assert "6 parked; send them again after a fix: chouette-relay retry AGENCY" in shown
    _, err = await cli_output(world, "parked", "--agency", "agence-z", expect=2)
    assert "agency agence-z is not in the routing file; did you mean agence-a?" in err
    status, body = await call(relay, "GET", f"/admin/parked?agency={AGENCY}", token=True)
    assert (status, body) == (200, {"parked": listed})

    # The partner's admin gives the rights; the operator retries bat-2 alone.
    world.sandbox.grant(spec.api_key, "c-2")
    world.sandbox.grant(spec.api_key, "c-3")
    status, queued = await call(relay, "POST", f"/admin/parked/{AGENCY}/bat-2/retry", token=True)
    assert status == 202
    assert len(queued["partitions"]) == 1  # the building's partition only

    expected = {d["id"]: d["content"]["sha256"] for d in documents["bat-2"]}
    await world.wait_until(lambda: world.partner_references("c-2") == expected, what="bat-2")
    await world.wait_until(lambda: _idle(relay), what="idle")
    assert set(_parked(relay).values()) == {"bat-3"}
    assert world.partner_references("c-3") == {}

    queued = await cli(world, "retry", AGENCY)
    assert len(queued["partitions"]) == 3

    expected = {d["id"]: d["content"]["sha256"] for d in documents["bat-3"]}
    await world.wait_until(lambda: world.partner_references("c-3") == expected, what="bat-3")
    await world.wait_until(lambda: _parked(relay) == {} and _idle(relay), what="none parked")
    assert (await cli(world, "parked")) == {"parked": []}
    assert world.sandbox.duplicated_references() == {}
    for building in ("bat-2", "bat-3"):
        assert [world.sandbox.create_count(d["id"]) for d in documents[building]] == [1, 1, 1]
