"""Operator commands report what came of them, and the commands topic keeps their history.

The replica owning each partition a command was written to answers with an outcome record on that
partition. The command line waits for every answer (bounded) and says them in words, with the
partitions that gave each: exit 0 when all carried the command out, 1 when one refused it (named),
4 when a partition did not answer in time. ``history`` lists every operator action with who asked
and its outcomes, read back from the commands topic, across restarts. Outcome records are never
carried out, nor dead-lettered.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson
import pytest

from consumer.app.relay import Relay
from tests.fixtures.relay import AgencySpec, WorldFactory
from tests.integration.operator_helpers import cli, cli_output, cli_terminal

pytestmark = pytest.mark.integration

AGENCY = "agence-nantes"
OTHER = "agence-lyon"


def _counted(relay: Relay, kind: str, outcome: str) -> float:
    labels = {"kind": kind, "outcome": outcome}
    return relay.registry.get_sample_value("chouette_relay_commands_total", labels) or 0.0


async def test_a_pause_says_where_it_was_carried_out_and_resume_gives_its_outcomes_as_json(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    relay = await world.start_relay()

    shown = await cli_terminal(world, "pause", AGENCY)

    assert "pause agence-nantes: written to partitions 0-2" in shown
    assert "paused on partitions 0-2" in shown
    assert relay.status()["paused"] == [AGENCY]
    resumed = await cli(world, "resume", AGENCY, "--json")
    assert [(o["partition"], o["outcome"], o["summary"]) for o in resumed["outcomes"]] == [
        (p, "carried_out", "resumed") for p in range(3)
    ]
    assert resumed["unanswered"] == []
    assert {o["requested_by"] for o in resumed["outcomes"]} == {
        resumed["outcomes"][0]["requested_by"]
    }
    assert resumed["outcomes"][0]["requested_by"].startswith("cli:")
    # The answers themselves are never taken for commands.
    assert await world.dead_letters() == []
    assert _counted(relay, "pause", "carried_out") == 3
    assert _counted(relay, "resume", "carried_out") == 3


async def test_a_stale_approve_exits_1_with_the_refusal_and_a_retry_says_why_nothing_is_sent(
    relay_world: WorldFactory,
) -> None:
    spec = AgencySpec(buildings={"bat-1": "c-1"}, approval="operator")
    world = await relay_world(agencies={AGENCY: spec})
    relay = await world.start_relay()
    documents = [world.document() for _ in range(3)]
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    await world.publish(*world.manifest_parts(AGENCY, "bat-1", documents, taken_at=taken_at))
    await world.wait_until(
        lambda: relay.status()["awaiting_approval"] == {AGENCY: ["bat-1"]}, what="approval awaited"
    )
    # The routing file changed on this side and is not rolled out: the plan the command line
    # computes is not the one the replica owning bat-1 computes.
    spec.first_publication = f"since:{dt.date.today() + dt.timedelta(days=1)}"
    world.write_config()
    mine = (await cli(world, "plan", "--agency", AGENCY, "--json"))["fingerprints"][AGENCY]

    out, err = await cli_output(world, "approve", AGENCY, "--plan", mine, expect=1)

    assert "the plan changed since it was shown; run `chouette-relay plan` again" in err
    answered = orjson.loads(out)
    refused = [o for o in answered["outcomes"] if o["outcome"] != "carried_out"]
    assert refused
    assert {o["outcome"] for o in refused} == {"plan_changed"}
    assert world.sandbox.documents("c-1") == []

    # A document of a building the routing does not map is parked; retrying cannot send it.
    await world.publish(world.document_created(AGENCY, "bat-99", world.document()))
    await world.wait_until(lambda: len(relay.parked()) == 1, what="the document parked")
    retried = await cli(world, "retry", AGENCY)
    said = "\n".join(retried["said"])
    assert "nothing to retry on partition" in said
    assert "bat-99 is unmapped; fix the routing file and restart" in said
    assert [o["still_parked"] for o in retried["outcomes"] if o["still_parked"]] == [
        {"unmapped_building": 1}
    ]


async def test_without_a_replica_the_wait_runs_out_with_its_own_exit_code(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    await world.stop_relay(await world.start_relay())  # the topics exist; no replica runs

    _, err = await cli_output(world, "pause", AGENCY, "--wait-s", "1", expect=4)

    assert "no answer from partitions 0-2 within 1 s: is a replica running?" in err
    queued = await cli(world, "resume", AGENCY, "--no-wait")
    assert "outcomes" not in queued
    assert len(queued["partitions"]) == 3


async def test_history_lists_every_action_with_its_outcomes_across_a_restart(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(
        agencies={
            AGENCY: AgencySpec(buildings={"bat-1": "c-1"}),
            OTHER: AgencySpec(buildings={"bat-2": "c-2"}),
        }
    )
    relay = await world.start_relay()
    await cli(world, "pause", AGENCY, "--backfill-only")
    await cli(world, "release", OTHER, "bat-2")
    await world.stop_relay(relay)
    relay = await world.start_relay()
    await cli(world, "resume", AGENCY)
    # A forged answer, and a command with an unknown agency: neither steers anything.
    producer = await world.producer()
    forged: dict[str, Any] = {"schema_version": 1, "command": "pause", "agency_id": AGENCY}
    forged["requested_at"] = "2026-01-02T03:04:05Z"
    await producer.send_and_wait(
        world.commands_topic,
        key=AGENCY.encode(),
        value=orjson.dumps(forged),
        partition=0,
        headers=[("chouette-relay-record", b"outcome")],
    )
    await cli(world, "resume", OTHER)  # answered on partition 0 after the forged record

    history = (await cli(world, "history"))["history"]

    assert [(h["command"], h["agency"], h.get("scope")) for h in history] == [
        ("pause", AGENCY, "backfill"),
        ("release", OTHER, None),
        ("resume", AGENCY, None),
        ("resume", OTHER, None),
    ]
    assert history[0]["said"] == ["first publication paused on partitions 0-2"]
    assert history[1]["building"] == "bat-2"
    assert len(history[1]["partitions"]) == 1
    assert [o["outcome"] for o in history[1]["outcomes"]] == ["carried_out"]
    assert [(o["where"], o["summary"]) for o in history[2]["outcomes"]] == [
        ("partitions 0-2", "resumed")
    ]
    assert all(h["requested_by"].startswith("cli:") for h in history)
    assert relay.status()["paused"] == []
    assert await world.dead_letters() == []
    mine = (await cli(world, "history", "--agency", AGENCY, "--limit", "1"))["history"]
    assert [(h["command"], h["agency"]) for h in mine] == [("resume", AGENCY)]
    table = await cli_terminal(world, "history", "--agency", AGENCY)
    assert "first publication paused on partitions 0-2" in table
    assert "resumed on partitions 0-2" in table


async def test_an_audit_repair_waits_for_the_owning_replica_to_say_what_it_fixes(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    relay = await world.start_relay()
    documents = [world.document() for _ in range(2)]
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    await world.publish(*world.manifest_parts(AGENCY, "bat-1", documents, taken_at=taken_at))
    await world.wait_until(lambda: len(world.partner_references("c-1")) == 2, what="published")
    [lost] = [d.id for d in world.sandbox.documents() if d.reference == documents[0]["id"]]
    world.sandbox.delete_by_hand(lost)

    report = await cli(world, "audit", "--agency", AGENCY, "--repair")

    [repair] = report["repairs"]
    assert [(o["command"], o["outcome"]) for o in repair["outcomes"]] == [("repair", "carried_out")]
    assert repair["said"] == [
        f"repair started on partition {repair['partitions'][0]['partition']}: "
        "1 document to fix on the partner"
    ]
    await world.wait_until(
        lambda: documents[0]["id"] in world.partner_references("c-1"), what="sent again"
    )
    assert _counted(relay, "repair", "carried_out") == 1
