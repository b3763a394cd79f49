"""The dry run of a first publication: what would be sent, per building and module, sending nothing.

Manifests are on the topic and no relay is running: the plan reads them (and the empty view) and
reports uploads, bytes and baseline per agency mode (history, since a date, fresh), while the
sandbox receives no request at all. The same plan is available as ``chouette-relay plan --json``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from consumer.core.planning.first_publication import DryRun
from consumer.core.routing import load_routing
from consumer.kafka.changelog import COMPACTED_TOPIC_CONFIG
from consumer.local.kafka import create_topics
from consumer.ops.dryrun import build_plan
from tests.fixtures.relay import AgencySpec, Json, RelayWorld, WorldFactory

pytestmark = pytest.mark.integration

OLD = dt.date(2021, 3, 1)
RECENT = dt.date(2025, 2, 1)
SINCE = "2024-01-01"


@dataclass(frozen=True)
class Expected:
    """What the plan must report for one building and module."""

    uploads: int = 0
    upload_bytes: int = 0
    baseline: int = 0


def _size(document: Json) -> int:
    size: int = document["content"]["size_bytes"]
    return size


async def _publish_manifests(world: RelayWorld) -> dict[tuple[str, str, str], Expected]:
    """Per agency: one building with old and recent documents in two modules, plus a document
    that routing never forwards. Returns the expected plan line of every building and module."""
    expected: dict[tuple[str, str, str], Expected] = {}
    for agency, spec in world.agencies.items():
        for building in spec.buildings:
            items = [
                *(world.document(module="ag", date=OLD) for _ in range(3)),
                *(world.document(module="ag", date=RECENT) for _ in range(2)),
                *(world.document(module="contrats", date=OLD) for _ in range(1)),
                *(world.document(module="contrats", date=RECENT) for _ in range(2)),
                # never forwarded: individual documents, and a module the agency does not enable
                world.document(module="ag", audience="individual", date=RECENT),
                world.document(module="comptes", date=RECENT),
            ]
            # every part of one snapshot carries the same taken_at
            parts = world.manifest_parts(
                agency,
                building,
                items,
                taken_at=dt.datetime.now(dt.UTC),
                modules=("ag", "contrats", "comptes"),
                parts=2,
            )
            await world.publish(*parts)
            for module in ("ag", "contrats"):
                listed = [d for d in items if d["module"] == module and d["audience"] == "building"]
                sent = [d for d in listed if _sends(spec.first_publication, d)]
                expected[(agency, building, module)] = Expected(
                    uploads=len(sent),
                    upload_bytes=sum(_size(d) for d in sent),
                    baseline=len(listed) - len(sent),
                )
    return expected


def _sends(mode: str, document: Json) -> bool:
    if mode == "history":
        return True
    if mode == "fresh":
        return False
    return bool(document["document_date"] >= mode.removeprefix("since:"))


def _lines(plan: DryRun) -> dict[tuple[str, str, str], Expected]:
    return {
        (line.agency_id, line.building_id, line.module.value): Expected(
            line.uploads, line.upload_bytes, line.baseline
        )
        for line in plan.lines
    }


async def _agencies_world(relay_world: WorldFactory) -> RelayWorld:
    return await relay_world(
        agencies={
            "agence-hist": AgencySpec(buildings={"bat-h": "c-h"}, first_publication="history"),
            "agence-since": AgencySpec(
                buildings={"bat-s": "c-s"}, first_publication=f"since:{SINCE}"
            ),
            "agence-fresh": AgencySpec(buildings={"bat-f": "c-f"}, first_publication="fresh"),
        }
    )


@pytest.fixture
async def world(relay_world: WorldFactory) -> RelayWorld:
    """The three agencies, with the (still empty) state topic a deployment creates."""
    world = await _agencies_world(relay_world)
    await create_topics(
        world.bootstrap, [world.state_topic], partitions=3, config=COMPACTED_TOPIC_CONFIG
    )
    return world


async def test_the_plan_counts_uploads_bytes_and_baseline_per_mode_and_sends_nothing(
    world: RelayWorld,
) -> None:
    expected = await _publish_manifests(world)
    routing = load_routing(world.routing_file)

    for agency in world.agencies:
        plan = await build_plan(world.settings(), routing, agency=agency)
        mine = {place: line for place, line in expected.items() if place[0] == agency}
        assert _lines(plan) == mine, agency
        assert plan.uploads == sum(line.uploads for line in mine.values())
        assert plan.upload_bytes == sum(line.upload_bytes for line in mine.values())
        assert plan.deletes == 0

    everything = await build_plan(world.settings(), routing, agency=None)
    assert _lines(everything) == expected
    counts = {place: (line.uploads, line.baseline) for place, line in _lines(everything).items()}
    # ag: 3 old and 2 recent documents; contrats: 1 old and 2 recent (the others never go)
    assert counts == {
        ("agence-hist", "bat-h", "ag"): (5, 0),
        ("agence-hist", "bat-h", "contrats"): (3, 0),
        ("agence-since", "bat-s", "ag"): (2, 3),
        ("agence-since", "bat-s", "contrats"): (2, 1),
        ("agence-fresh", "bat-f", "ag"): (0, 5),
        ("agence-fresh", "bat-f", "contrats"): (0, 3),
    }
    assert everything.estimated_seconds(2.0) == everything.uploads / 2.0

    assert world.sandbox.request_count() == 0
    assert world.sandbox.documents() == []


async def test_the_plan_command_prints_the_same_plan_as_json(world: RelayWorld) -> None:
    expected = await _publish_manifests(world)

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumer.cli",
        "plan",
        "--json",
        env=world.environment(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)

    assert process.returncode == 0, stderr.decode()
    output: dict[str, Any] = orjson.loads(stdout)
    lines = {
        (line["agency"], line["building"], line["module"]): Expected(
            line["uploads"], line["upload_bytes"], line["baseline"]
        )
        for line in output["lines"]
    }
    assert lines == expected
    assert output["uploads"] == sum(line.uploads for line in expected.values())
    assert output["upload_bytes"] == sum(line.upload_bytes for line in expected.values())
    assert output["baseline"] == sum(line.baseline for line in expected.values())
    assert output["deletes"] == 0
    assert world.sandbox.request_count() == 0


async def test_the_plan_works_before_any_relay_has_created_the_state_topic(
    relay_world: WorldFactory,
) -> None:
    world = await _agencies_world(relay_world)
    expected = await _publish_manifests(world)

    routing = load_routing(world.routing_file)
    plan = await asyncio.wait_for(build_plan(world.settings(), routing, agency=None), timeout=10)

    assert _lines(plan) == expected
    assert world.sandbox.request_count() == 0
