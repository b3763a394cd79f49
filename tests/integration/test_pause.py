"""Pausing an agency: nothing of it is sent, its work waits uncommitted, and a restart keeps it.

An operator pauses an agency (CLI or admin endpoint); the command reaches every partition, each
records it in its view, and the scheduler starts none of the agency's operations, live or
backfill, while other agencies flow. After a restart the pause still holds and the waiting work
is read again; resuming sends exactly what waited, each document once.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson
import pytest

from consumer.app.relay import Relay
from tests.fixtures.relay import AgencySpec, Json, RelayWorld, WorldFactory, metric, ops_get
from tests.integration.operator_helpers import call, cli, token_http

pytestmark = pytest.mark.integration

PAUSED, OTHER = "agence-a", "agence-b"


def _held(relay: Relay) -> int:
    """Operations of paused agencies, waiting in the partitions' executors."""
    partitions: dict[str, Any] = relay.status()["partitions"]
    return sum(p["held_operations"] for p in partitions.values())


def _paused_everywhere(relay: Relay, agencies: list[str]) -> bool:
    partitions: dict[str, Any] = relay.status()["partitions"]
    return len(partitions) == 3 and all(p["paused"] == agencies for p in partitions.values())


def _references(documents: list[Json]) -> dict[str, str]:
    return {d["id"]: d["content"]["sha256"] for d in documents}


async def _publish(world: RelayWorld) -> tuple[list[Json], list[Json]]:
    """Live documents and a manifest (backfill) for the paused agency, live ones for the other."""
    live = [world.document() for _ in range(4)]
    listed = [world.document() for _ in range(5)]
    await world.publish(*(world.document_created(PAUSED, "bat-1", d) for d in live))
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    await world.publish(*world.manifest_parts(PAUSED, "bat-2", listed, taken_at=taken_at))
    others = [world.document() for _ in range(3)]
    await world.publish(*(world.document_created(OTHER, "bat-9", d) for d in others))
    return live + listed, others


async def test_a_paused_agency_waits_across_a_restart_and_resume_sends_what_waited_once(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(
        agencies={
            PAUSED: AgencySpec(buildings={"bat-1": "c-1", "bat-2": "c-2"}),
            OTHER: AgencySpec(buildings={"bat-9": "c-9"}),
        }
    )
    http = token_http(world.tmp)
    relay = await world.start_relay(http=http)

    status, queued = await call(relay, "POST", f"/admin/agencies/{PAUSED}/pause", token=True)
    assert status == 202
    assert len(queued["partitions"]) == 3  # an agency spans every partition
    await world.wait_until(lambda: _paused_everywhere(relay, [PAUSED]), what="the pause")
    waiting, others = await _publish(world)

    await world.wait_until(
        lambda: world.partner_references("c-9") == _references(others), what="the other agency"
    )
    await world.wait_until(lambda: _held(relay) == 9, what="the paused work queued")
    assert world.partner_references("c-1") == {}
    assert world.partner_references("c-2") == {}
    assert relay.status()["paused"] == [PAUSED]
    served = orjson.loads(await ops_get(relay, "/status"))  # what an operator's curl sees
    assert (served["paused"], served["scheduler"]["paused"]) == ([PAUSED], [PAUSED])

    async def gauge_says_paused() -> bool:
        gauge = "chouette_relay_agency_paused"
        return await metric(relay, gauge, agency=PAUSED, scope="live_and_backfill") == 1.0

    await world.wait_until(gauge_says_paused, what="the paused gauge", timeout=10)
    assert (
        await metric(relay, "chouette_relay_agency_paused", agency=OTHER, scope="live_and_backfill")
        == 0.0
    )

    await world.stop_relay(relay)
    relay = await world.start_relay(http=http)

    assert _paused_everywhere(relay, [PAUSED])
    await world.wait_until(lambda: _held(relay) == 9, what="the waiting work read again")
    assert world.partner_references("c-1") == {}
    assert world.partner_references("c-2") == {}

    resumed = await cli(world, "resume", PAUSED)
    assert resumed["queued"] == "resume"

    await world.wait_until(
        lambda: (
            {**world.partner_references("c-1"), **world.partner_references("c-2")}
            == _references(waiting)
        ),
        what="what waited, sent",
    )
    await world.wait_until(lambda: _paused_everywhere(relay, []), what="the resume everywhere")
    assert [world.sandbox.create_count(d["id"]) for d in waiting] == [1] * len(waiting)
    assert world.sandbox.duplicated_references() == {}


def _backfill_paused_everywhere(relay: Relay, agencies: list[str]) -> bool:
    partitions: dict[str, Any] = relay.status()["partitions"]
    return len(partitions) == 3 and all(
        p["backfill_paused"] == agencies and p["paused"] == [] for p in partitions.values()
    )


async def test_a_backfill_only_pause_holds_the_first_publication_while_live_documents_flow(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(
        agencies={PAUSED: AgencySpec(buildings={"bat-1": "c-1", "bat-2": "c-2"})}
    )
    http = token_http(world.tmp)
    relay = await world.start_relay(http=http)

    queued = await cli(world, "pause", PAUSED, "--backfill-only")
    assert (queued["queued"], queued["scope"]) == ("pause", "backfill")
    await world.wait_until(
        lambda: _backfill_paused_everywhere(relay, [PAUSED]), what="the backfill-only pause"
    )
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    listed = [world.document() for _ in range(5)]
    await world.publish(*world.manifest_parts(PAUSED, "bat-2", listed, taken_at=taken_at))
    await world.wait_until(lambda: _held(relay) == 5, what="the first publication held")
    live = world.document()
    await world.publish(world.document_created(PAUSED, "bat-1", live))

    await world.wait_until(
        lambda: world.partner_references("c-1") == _references([live]), what="the live document"
    )
    assert world.partner_references("c-2") == {}

    async def gauge_says_backfill_paused() -> bool:
        gauge = "chouette_relay_agency_paused"
        return await metric(relay, gauge, agency=PAUSED, scope="backfill") == 1.0

    await world.wait_until(gauge_says_backfill_paused, what="the paused gauge", timeout=10)

    await world.stop_relay(relay)
    relay = await world.start_relay(http=http)

    assert _backfill_paused_everywhere(relay, [PAUSED])
    await world.wait_until(lambda: _held(relay) == 5, what="the first publication read again")
    assert world.partner_references("c-2") == {}

    assert (await cli(world, "resume", PAUSED))["queued"] == "resume"
    await world.wait_until(
        lambda: world.partner_references("c-2") == _references(listed),
        what="the first publication finished",
    )
    assert [world.sandbox.create_count(d["id"]) for d in [live, *listed]] == [1] * 6


async def test_pausing_needs_the_admin_token(relay_world: WorldFactory) -> None:
    world = await relay_world(agencies={PAUSED: AgencySpec(buildings={"bat-1": "c-1"})})
    relay = await world.start_relay(http=token_http(world.tmp))

    assert (await call(relay, "POST", f"/admin/agencies/{PAUSED}/pause"))[0] == 401
    assert (await call(relay, "POST", "/admin/agencies/not an id!/pause", token=True))[0] == 400
    for wrong in ("pause?scope=live", "resume?scope=backfill"):
        assert (await call(relay, "POST", f"/admin/agencies/{PAUSED}/{wrong}", token=True))[
            0
        ] == 400
    status, queued = await call(
        relay, "POST", f"/admin/agencies/{PAUSED}/pause?scope=backfill", token=True
    )
    assert (status, queued["scope"]) == (202, "backfill")
    assert relay.status()["paused"] == []
