"""``chouette-relay plan`` once a first publication is over: "No changes", not a plan to approve.

With ``--detailed-exitcode`` (Terraform's), a script tells both apart: 3 while there is something
to send, 0 once everything is applied.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest

from consumer.core.planning.first_publication import DryRun
from consumer.core.routing import RoutingTable
from consumer.ops.dryrun import render
from tests.fixtures.relay import AgencySpec, WorldFactory
from tests.integration.operator_helpers import cli, cli_output

pytestmark = pytest.mark.integration

AGENCY = "agence-neuve"


async def test_a_finished_first_publication_plans_no_changes(relay_world: WorldFactory) -> None:
    world = await relay_world(
        agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"}, approval="operator")}
    )
    await world.start_relay()
    documents = [world.document() for _ in range(3)]
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    await world.publish(*world.manifest_parts(AGENCY, "bat-1", documents, taken_at=taken_at))

    async def planned() -> bool:
        shown = await cli(world, "plan", "--agency", AGENCY, "--json")
        return bool(shown["uploads"] == 3)

    await world.wait_until(planned, what="the plan of the manifest")
    waiting, _ = await cli_output(
        world, "plan", "--agency", AGENCY, "--detailed-exitcode", expect=3
    )
    fingerprint = waiting.rsplit("--plan ", 1)[1].strip()
    await cli(world, "approve", AGENCY, "--plan", fingerprint)
    await world.wait_until(
        lambda: len(world.partner_references("c-1")) == 3, what="the first publication"
    )

    async def nothing_left() -> bool:
        shown = await cli(world, "plan", "--agency", AGENCY, "--json")
        return shown["changes"] is False

    await world.wait_until(nothing_left, what="a plan with nothing left")
    text, _ = await cli_output(world, "plan", "--agency", AGENCY, "--detailed-exitcode")
    assert text == (
        f"No changes: the newest manifests of {AGENCY} are applied; nothing to send and nothing "
        "to approve.\n"
    )


def test_an_empty_plan_offers_nothing_to_approve() -> None:
    routing = RoutingTable.from_mapping(
        {"agencies": {AGENCY: {"modules": ["ag"], "first_publication": "history"}}}
    )
    text = render(DryRun(), routing, 5.0, {AGENCY: "0123456789abcdef"})
    assert text.startswith("No changes")
    assert "approve" not in text.replace("nothing to approve", "")


def test_the_version_is_printed() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "consumer.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.startswith("chouette-relay ")


def test_the_help_says_where_settings_come_from_and_what_exit_codes_mean() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "consumer.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "CHOUETTE_RELAY_KAFKA__BOOTSTRAP_SERVERS" in done.stdout
    assert ". var/local/operator.env" in done.stdout
    assert "3 `plan --detailed-exitcode` has" in done.stdout
