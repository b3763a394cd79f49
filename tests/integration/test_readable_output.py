"""``held``, ``dead-letters`` and ``approve`` read by a person on a terminal, JSON for a program.

On a terminal each prints what an operator acts on: per held building what waits, since when,
and the release and discard commands to run; per dead letter when it failed, where it came from,
why, and whether and when it was replayed, then a count by reason; for an approve, the owning
replicas' outcome in words. With ``--json``, or piped, the same commands print JSON.
"""

from __future__ import annotations

import datetime as dt

import pytest

from consumer.app.relay import Relay
from tests.fixtures.relay import AgencySpec, Json, RelayWorld, WorldFactory
from tests.integration.operator_helpers import cli, cli_output, cli_terminal, token_http

pytestmark = pytest.mark.integration

AGENCY, OTHER = "agence-a", "agence-b"


def _idle(relay: Relay) -> bool:
    return all(p["pending_operations"] == 0 for p in relay.status()["partitions"].values())


def _references(documents: list[Json]) -> dict[str, str]:
    return {d["id"]: d["content"]["sha256"] for d in documents}


async def _dead_letters(world: RelayWorld, *args: str) -> list[Json]:
    letters: list[Json] = (await cli(world, "dead-letters", *args))["dead_letters"]
    return letters


async def test_held_and_dead_letters_read_as_text_on_a_terminal_and_as_json_with_json(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(
        agencies={
            AGENCY: AgencySpec(buildings={"bat-1": "c-1"}),
            OTHER: AgencySpec(buildings={"bat-9": "c-9"}),
        }
    )
    relay = await world.start_relay(http=token_http(world.tmp))
    documents = [world.document() for _ in range(30)]
    published_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    await world.publish(*world.manifest_parts(AGENCY, "bat-1", documents, taken_at=published_at))
    await world.wait_until(
        lambda: world.partner_references("c-1") == _references(documents) and _idle(relay),
        timeout=60,
        what="the building on the partner",
    )
    # LSC's newer export lists 5 of the 30: the guard holds the manifest.
    taken_at = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).replace(microsecond=0)
    await world.publish(*world.manifest_parts(AGENCY, "bat-1", documents[:5], taken_at=taken_at))
    await world.publish_raw(world.documents_topic, key=b"agence-a:bat-1", value=b"{not json")
    await world.publish_raw(world.documents_topic, key=b"agence-b:bat-9", value=b"[not json")

    async def both_there() -> bool:
        return len(relay.held()) == 1 and len(await _dead_letters(world)) == 2

    await world.wait_until(both_there, timeout=60, what="the hold and two dead letters")

    [held] = (await cli(world, "held", "--agency", AGENCY, "--json"))["held"]
    assert (held["building"], held["withdrawals"], held["uploads"]) == ("bat-1", 25, 0)
    assert dt.datetime.fromisoformat(held["since"]) == taken_at
    assert (await cli(world, "held", "--agency", OTHER))["held"] == []  # piped: JSON
    shown = await cli_terminal(world, "held", "--agency", AGENCY)
    since = f"{taken_at:%Y-%m-%d %H:%M:%S}"
    assert f"agence-a bat-1: manifest {held['snapshot_id']} held since {since}" in shown
    assert "waits     25 documents: 25 withdrawals, 0 uploads" in shown
    assert "chouette-relay release agence-a bat-1" in shown
    assert "chouette-relay discard agence-a bat-1" in shown
    assert "No held manifests" in await cli_terminal(world, "held", "--agency", OTHER)

    [letter] = await _dead_letters(world, "--agency", AGENCY, "--json")
    assert (letter["reason"], letter["key"], letter["replayed"]) == (
        "not_json",
        "agence-a:bat-1",
        False,
    )
    shown = await cli_terminal(world, "dead-letters", "--agency", AGENCY)
    rows = [line for line in shown.splitlines() if letter["id"] in line]
    assert len(rows) == 1
    assert rows[0].split()[2:5] == [letter["id"], "not_json", "no"]
    assert "dead letters: 1 (not_json 1), 1 not replayed" in shown
    assert OTHER not in shown

    # Replayed (the same bytes, so forced): the line says when.
    await cli_output(world, "replay", letter["id"], "--force")

    async def replayed() -> bool:
        return any(
            entry["id"] == letter["id"] and entry["replayed"]
            for entry in await _dead_letters(world)
        )

    await world.wait_until(replayed, timeout=60, what="the replay recorded")
    [original] = [e for e in await _dead_letters(world) if e["id"] == letter["id"]]
    moment = dt.datetime.fromisoformat(original["replayed_at"]).astimezone(dt.UTC)
    shown = await cli_terminal(world, "dead-letters", "--agency", AGENCY)
    [row] = [line for line in shown.splitlines() if line.split()[2:3] == [letter["id"]]]
    assert f"not_json               {moment:%Y-%m-%d %H:%M:%S}" in row
    assert "No dead letters." in await cli_terminal(world, "dead-letters", "--reason", "oversized")


async def test_an_approve_on_a_terminal_says_its_outcome(relay_world: WorldFactory) -> None:
    world = await relay_world(
        agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"}, approval="operator")}
    )
    relay = await world.start_relay(http=token_http(world.tmp))
    documents = [world.document() for _ in range(3)]
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    await world.publish(*world.manifest_parts(AGENCY, "bat-1", documents, taken_at=taken_at))
    await world.wait_until(
        lambda: relay.status()["awaiting_approval"] == {AGENCY: ["bat-1"]}, what="the approval"
    )
    plan = (await cli(world, "plan", "--agency", AGENCY, "--json"))["fingerprints"][AGENCY]

    shown = await cli_terminal(world, "approve", AGENCY, "--plan", plan)

    # Waited for: the owning replica's outcome, in words, with the uploads it started.
    assert f"approve {AGENCY}: written to partition" in shown
    assert "approved on partition" in shown
    assert "3 uploads" in shown
    await world.wait_until(
        lambda: world.partner_references("c-1") == _references(documents),
        timeout=60,
        what="the approved first publication",
    )
