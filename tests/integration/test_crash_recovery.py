"""Crashes and restarts during a backfill lose nothing and upload nothing twice.

The relay writes an upload intent before every partner call and commits input offsets only up to
finished work, so a relay killed at any moment and started again must finish the publication with
every document on the partner exactly once. The same holds for a relay stopped in the middle of
its work and started again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import random
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from tests.fixtures.relay import AgencySpec, Json, RelayWorld, WorldFactory

pytestmark = pytest.mark.integration

MODULES = ("ag", "contrats", "carnet_entretien", "diagnostics")
ITEMS_PER_PART = 200
DRAIN_TIMEOUT_S = 5.0  # the harness's drain timeout
EXIT_MARGIN_S = 10.0  # leaving the group and closing the producer after the drain


def history(world: RelayWorld, count: int) -> list[Json]:
    """``count`` forwardable documents; one in five is fetched from the document store."""
    return [
        world.document(
            module=MODULES[index % len(MODULES)],
            date=dt.date(2018, 1, 1) + dt.timedelta(days=index),
            inline=index % 5 != 0,
        )
        for index in range(count)
    ]


def manifest(world: RelayWorld, agency: str, building: str, items: list[Json]) -> list[Json]:
    return world.manifest_parts(
        agency,
        building,
        items,
        parts=max(1, math.ceil(len(items) / ITEMS_PER_PART)),
    )


def uploaded(world: RelayWorld) -> int:
    return len(world.partner_references())


def reached(world: RelayWorld, count: int) -> Callable[[], bool]:
    return lambda: uploaded(world) >= count


def assert_published_exactly_once(world: RelayWorld, expected: dict[str, str]) -> None:
    assert world.partner_references() == expected
    assert world.sandbox.duplicated_references() == {}
    assert all(world.sandbox.create_count(reference) == 1 for reference in expected)
    assert len(world.sandbox.documents()) == len(expected)


async def wait_for_exit(
    world: RelayWorld, process: subprocess.Popen[bytes], *, within: float
) -> int:
    # Polled, not process.wait(): the sandbox serving the draining relay runs on this loop.
    await world.wait_until(lambda: process.poll() is not None, timeout=within, what="the exit")
    code = process.returncode
    assert code is not None
    return code


def log_messages(log_path: Path) -> list[str]:
    messages = []
    for line in log_path.read_bytes().splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # a line cut short by SIGKILL
        if isinstance(entry, dict):
            messages.append(str(entry.get("msg")))
    return messages


async def test_a_relay_killed_three_times_mid_backfill_publishes_every_document_exactly_once(
    relay_world: WorldFactory, tmp_path: Path
) -> None:
    world = await relay_world(
        agencies={
            "agence-a": AgencySpec(
                buildings={"bat-1": "c-1", "bat-2": "c-2"}, rate_per_second=50.0, burst=5
            ),
            "agence-b": AgencySpec(buildings={"bat-3": "c-3"}, rate_per_second=30.0, burst=5),
        },
        partitions=3,
    )
    documents = {
        ("agence-a", "bat-1"): history(world, 500),
        ("agence-a", "bat-2"): history(world, 500),
        ("agence-b", "bat-3"): history(world, 500),
    }
    expected = {d["id"]: d["content"]["sha256"] for docs in documents.values() for d in docs}
    # Slow answers keep several uploads in flight at every moment, so a kill leaves intents whose
    # outcome the next run must look up (some reached the partner, some did not).
    world.sandbox.set_faults(latency_ms=50)
    rng = random.Random(20_251_104)  # noqa: S311 - reproducible crash moments
    log_path = tmp_path / "relay.log"

    process = world.spawn_relay(log_path)
    for (agency, building), items in documents.items():
        await world.publish(*manifest(world, agency, building, items))

    for crash in range(3):
        if crash == 1:
            # Soon after a restart: while the relay joins the group, restores or reconciles.
            await asyncio.sleep(rng.uniform(1.0, 4.0))
        else:
            # In the middle of the uploads: some documents into this run, then a little more.
            await world.wait_until(
                reached(world, uploaded(world) + rng.randint(5, 200)),
                timeout=30,
                what=f"progress before crash {crash + 1}",
            )
            await asyncio.sleep(rng.uniform(0.0, 0.5))
        world.kill(process)
        assert uploaded(world) < len(expected), "the backfill ended before the crash"
        process = world.spawn_relay(log_path)

    await world.wait_until(
        lambda: world.partner_references() == expected, timeout=120, what="the whole backfill"
    )
    assert_published_exactly_once(world, expected)

    process.send_signal(signal.SIGTERM)
    assert await wait_for_exit(world, process, within=DRAIN_TIMEOUT_S + EXIT_MARGIN_S) == 0
    log = log_path.read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in log
    messages = log_messages(log_path)
    assert "upload intents reconciled" in messages
    assert messages[-1] == "stopped cleanly"
    assert_published_exactly_once(world, expected)


async def test_a_relay_stopped_mid_backfill_finishes_the_work_after_a_restart(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(
        agencies={
            "agence-a": AgencySpec(
                buildings={"bat-1": "c-1", "bat-2": "c-2"}, rate_per_second=40.0, burst=5
            )
        },
        partitions=3,
    )
    documents = {"bat-1": history(world, 300), "bat-2": history(world, 300)}
    expected = {d["id"]: d["content"]["sha256"] for docs in documents.values() for d in docs}
    relay = await world.start_relay()
    for building, items in documents.items():
        await world.publish(*manifest(world, "agence-a", building, items))

    await world.wait_until(lambda: uploaded(world) >= 150, timeout=30, what="a quarter done")
    loop = asyncio.get_running_loop()
    stopping = loop.time()
    await world.stop_relay(relay)
    assert loop.time() - stopping < DRAIN_TIMEOUT_S + EXIT_MARGIN_S
    assert uploaded(world) < len(expected), "the backfill ended before the stop"

    await world.start_relay()
    await world.wait_until(
        lambda: world.partner_references() == expected, timeout=45, what="the rest of the backfill"
    )
    assert_published_exactly_once(world, expected)
