"""``chouette-relay status``: one agency's whole state across the cluster, readable or as JSON.

It reads Kafka, not one replica: published documents and bytes against what manifests would
still send, the live backlog the consumer group has not committed (here: a paused agency's
documents), parked documents with their reasons, dead letters, and the pause. The admin endpoint
serves the same view with the replica's breakers added.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from consumer.app.relay import Relay
from consumer.ops.admin import Operator
from consumer.ops.overview import gather
from tests.fixtures.relay import AgencySpec, WorldFactory
from tests.integration.operator_helpers import call, cli, cli_output, many_documents, token_http

pytestmark = pytest.mark.integration

AGENCY = "agence-a"


def _idle(relay: Relay) -> bool:
    return all(p["pending_operations"] == 0 for p in relay.status()["partitions"].values())


def _held(relay: Relay) -> int:
    """Operations of paused agencies, waiting in the partitions' executors."""
    partitions: dict[str, Any] = relay.status()["partitions"]
    return sum(p["held_operations"] for p in partitions.values())


async def test_status_shows_progress_backlog_parked_dead_letters_and_the_pause(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    relay = await world.start_relay(http=token_http(world.tmp))
    listed = [world.document() for _ in range(3)]
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    await world.publish(*world.manifest_parts(AGENCY, "bat-1", listed, taken_at=taken_at))
    await world.publish(world.document_created(AGENCY, "bat-5", world.document()))  # unmapped
    await world.publish_raw(world.documents_topic, key=b"agence-a:bat-1", value=b"[")
    await world.wait_until(
        lambda: len(world.partner_references("c-1")) == 3 and len(relay.parked()) == 1,
        what="published and parked",
    )
    await cli(world, "pause", AGENCY)
    await world.wait_until(lambda: relay.status()["paused"] == [AGENCY], what="the pause")
    await world.publish(*(world.document_created(AGENCY, "bat-1", world.document()) for _ in "ab"))
    await world.wait_until(lambda: _held(relay) == 2, what="two documents waiting")

    [entry] = (await cli(world, "status", "--json")).values()

    sizes = sum(d["content"]["size_bytes"] for d in listed)
    assert {k: entry[k] for k in ("agency", "paused", "published", "published_bytes")} == {
        "agency": AGENCY,
        "paused": True,
        "published": 3,
        "published_bytes": sizes,
    }
    assert (entry["remaining"], entry["progress"]) == (0, 1.0)
    assert (entry["live_backlog"], entry["manifest_backlog"]) == (2, 0)
    assert (entry["parked"], entry["parked_reasons"]) == (1, {"unmapped_building": 1})
    assert (entry["dead_letters"], entry["dead_letter_reasons"]) == (1, {"not_json": 1})
    assert entry["held"] == 0

    text, _ = await cli_output(world, "status", "--agency", AGENCY)
    assert text.startswith(f"{AGENCY}  (PAUSED: nothing is sent)")
    assert "[########################] 100%  3 of 3 documents" in text
    assert "live backlog       2 documents" in text
    assert "parked             1 (unmapped_building 1)" in text
    assert "dead letters       1 (not_json 1)" in text

    status, body = await call(relay, "GET", "/admin/overview", token=True)
    overview: dict[str, Any] = body[AGENCY]
    assert status == 200
    assert overview["breaker"] == "closed"
    assert {k: v for k, v in overview.items() if k != "breaker"} == {
        k: v for k, v in entry.items() if k != "breaker"
    }


async def test_the_progress_total_holds_still_while_a_first_publication_runs(
    relay_world: WorldFactory,
) -> None:
    """Published and still to send are counted in one read of the state: a document sent between
    two reads is neither lost from the total nor counted twice."""
    documents = 240
    world = await relay_world(
        agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"}, rate_per_second=40, burst=1)}
    )
    await world.start_relay()
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    listed = many_documents(world, documents)
    await world.publish(*world.manifest_parts(AGENCY, "bat-1", listed, taken_at=taken_at))
    totals: list[int] = []
    async with Operator(world.settings()) as operator:
        while True:
            [entry] = (await gather(operator, agency=AGENCY)).values()
            if 0 < entry.published < documents:
                totals.append(entry.published + entry.remaining)
            if entry.published == documents or len(totals) == 4:
                break
    assert len(totals) >= 2, "the publication ended before it could be watched"
    assert totals == [documents] * len(totals)


async def test_dead_letters_of_one_agency(relay_world: WorldFactory) -> None:
    world = await relay_world(
        agencies={
            "agence-a": AgencySpec(buildings={"bat-1": "c-1"}),
            "agence-b": AgencySpec(buildings={"bat-2": "c-2"}),
        }
    )
    await world.start_relay()
    await world.publish_raw(world.documents_topic, key=b"agence-a:bat-1", value=b"[")
    await world.publish_raw(world.documents_topic, key=b"agence-b:bat-2", value=b"{")

    async def both_listed() -> bool:
        return len((await cli(world, "dead-letters"))["dead_letters"]) == 2

    await world.wait_until(both_listed, what="two dead letters")
    shown = (await cli(world, "dead-letters", "--agency", "agence-b"))["dead_letters"]
    assert [letter["key"] for letter in shown] == ["agence-b:bat-2"]
    assert (await cli(world, "held", "--agency", "agence-b"))["held"] == []
