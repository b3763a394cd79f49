"""A building's complete manifest of 50,000 items converges in one pass on the real broker.

Its plan writes one state record per item: they go out in bounded chunks, so the producer never
times out, the consumer group never loses its session, and the manifest is applied once, its
offsets committed. (Before, every record was one awaited send, all gathered at once: the producer
timed out, the group rebalanced and the manifest was applied again and again, never committed.)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import aiohttp
import pytest

from tests.fixtures.relay import AgencySpec, Json, WorldFactory, metric, uncommitted_records

pytestmark = pytest.mark.integration

AGENCY, BUILDING = "agence-a", "bat-1"
ITEMS = 50_000
PER_PART = 2_500  # about 900 kB a part, under the topic's 1 MiB


def _item(number: int, host: str) -> Json:
    return {
        "id": f"doc-{number:06d}",
        "module": "ag",
        "category": "Documents",
        "title": f"Document {number}",
        "document_date": "2024-01-01",
        "audience": "building",
        "content": {
            "media_type": "application/pdf",
            "size_bytes": 1000 + number,
            "sha256": uuid.UUID(int=number).hex * 2,
            "url": f"http://{host}/lsc/{number}.pdf",
        },
    }


async def test_a_fifty_thousand_item_manifest_is_applied_once_and_committed(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(
        agencies={AGENCY: AgencySpec(buildings={BUILDING: "c-1"}, first_publication="fresh")},
        partitions=1,
    )
    relay = await world.start_relay()
    host = f"{world.store.host}:{world.store.port}"
    items = [_item(n, host) for n in range(ITEMS)]
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    await world.publish(
        *world.manifest_parts(AGENCY, BUILDING, items, taken_at=taken_at, parts=ITEMS // PER_PART)
    )

    failed_probes = 0

    async def probe_liveness() -> None:
        nonlocal failed_probes
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    # A Kubernetes liveness probe's default timeout is 1 s; ours allows 5.
                    async with session.get(
                        f"http://127.0.0.1:{relay.ops_port}/livez",
                        timeout=aiohttp.ClientTimeout(total=5),
                    ) as answer:
                        failed_probes += answer.status != 200
                except TimeoutError:
                    failed_probes += 1
                await asyncio.sleep(0.2)

    probing = asyncio.create_task(probe_liveness())
    try:
        await world.wait_until(
            lambda: relay.status()["partitions"]["0"]["documents"] == ITEMS,
            timeout=240,
            what="every item in the view",
        )
        await world.wait_until(
            lambda: _no_uncommitted(world), timeout=120, what="the manifest's offsets committed"
        )
    finally:
        probing.cancel()

    assert await metric(relay, "chouette_relay_manifests_total", outcome="complete") == 1
    assert failed_probes == 0
    state = await world.read_topic(world.state_topic)
    assert len({record.key for record in state}) >= ITEMS  # every item's record, once compacted
    assert world.sandbox.documents() == []  # fresh: what is listed at cut-over is never sent


async def _no_uncommitted(world: object) -> bool:
    return await uncommitted_records(world) == 0  # type: ignore[arg-type]
