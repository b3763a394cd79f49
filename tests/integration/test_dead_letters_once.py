"""A poison record is dead-lettered once, whatever crash comes between its dead letter and the
commit of its offset.

The relay commits an input offset only after the record's dead letter is acknowledged, so a relay
killed in between reads the record again after its restart. It finds the dead letter written
before the crash and does not write another: the dead-letter topic, ``chouette-relay
dead-letters`` and the dead-letter metric (which its alert sums) count the record once. Copies
an older relay wrote are listed once too.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from consumer.core.deadletter import build_dead_letter
from consumer.local.kafka import create_topics, free_port
from consumer.settings import HttpSettings
from tests.fixtures.relay import AgencySpec, RelayWorld, WorldFactory, uncommitted_records
from tests.integration.operator_helpers import cli

pytestmark = pytest.mark.integration

AGENCY = "agence-a"
KEY = b"agence-a:bat-1"


async def sources(world: RelayWorld) -> list[tuple[str, int, int]]:
    """The source record of each dead letter in the topic, in the topic's order."""
    return [
        (d["source"]["topic"], d["source"]["partition"], d["source"]["offset"])
        for d in await world.dead_letters()
    ]


async def scraped(port: int, name: str, **labels: str) -> float | None:
    """One sample of a relay running in a child process, from its ``/metrics``."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        response.raise_for_status()
        exposition = await response.text()
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


async def test_a_poison_record_read_again_after_a_sigkill_is_dead_lettered_once(
    relay_world: WorldFactory, tmp_path: Path
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    log_path = tmp_path / "relay.log"
    # No commit for an hour: the kill below falls between the dead letter and the commit.
    rare_commits = world.settings().kafka.model_copy(update={"commit_interval_s": 3600.0})
    first = world.spawn_relay(log_path, kafka=rare_commits)
    await world.publish_raw(world.documents_topic, key=KEY, value=b"{not json")

    async def dead_lettered() -> bool:
        return len(await sources(world)) == 1

    await world.wait_until(dead_lettered, timeout=60, what="the poison record dead-lettered")
    [poison] = await sources(world)
    assert await uncommitted_records(world) == 1, "the poison record's offset was committed"
    world.kill(first)

    port = free_port()
    second = world.spawn_relay(log_path, http=HttpSettings(host="127.0.0.1", port=port))

    async def committed() -> bool:
        return await uncommitted_records(world) == 0

    await world.wait_until(committed, timeout=90, what="the restarted relay past the poison record")
    # A poison record the restarted relay reads for the first time is dead-lettered as ever.
    await world.publish_raw(world.documents_topic, key=KEY, value=b"[not json either")

    async def both_dead_lettered() -> bool:
        return len(set(await sources(world))) == 2

    await world.wait_until(both_dead_lettered, timeout=60, what="the second poison record")
    await world.wait_until(committed, timeout=60, what="the second poison record committed")

    found = await sources(world)
    assert len(found) == len(set(found)) == 2, f"a record was dead-lettered twice: {found}"
    assert found[0] == poison
    listed = (await cli(world, "dead-letters"))["dead_letters"]
    assert [d["id"] for d in listed] == [f"{t}/{p}/{o}" for t, p, o in found]
    # The restarted relay counts the one record it dead-lettered, not the one read again.
    assert (
        await scraped(port, "chouette_relay_dead_letters_total", agency=AGENCY, reason="not_json")
        == 1
    )
    assert second.poll() is None
    assert "Traceback" not in log_path.read_text(encoding="utf-8", errors="replace")


async def test_dead_letters_written_twice_by_an_older_relay_are_listed_once(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    await create_topics(world.bootstrap, [world.dead_letter_topic], partitions=1)
    for offset, failed_at in ((7, 1), (7, 2), (8, 3)):
        key, value, headers = build_dead_letter(
            source_topic=world.documents_topic,
            partition=0,
            offset=offset,
            timestamp_ms=None,
            key=KEY,
            value=b"{not json",
            headers=[],
            reason="not_json",
            detail="not JSON",
            failed_at=dt.datetime(2025, 1, 1, 0, failed_at, tzinfo=dt.UTC),
            relay_version="0.1.0",
        )
        await world.publish_raw(
            world.dead_letter_topic,
            key=key,
            value=value,
            headers=[(n, v) for n, v in headers if v is not None],
        )

    listed = (await cli(world, "dead-letters"))["dead_letters"]
    source = f"{world.documents_topic}/0"
    assert [(d["id"], d["failed_at"]) for d in listed] == [
        (f"{source}/7", "2025-01-01T00:01:00.000Z"),
        (f"{source}/8", "2025-01-01T00:03:00.000Z"),
    ]
