from __future__ import annotations
import asyncio, time
import aiohttp
import pytest
from tests.fixtures.relay import AgencySpec, WorldFactory

pytestmark = pytest.mark.integration

async def scrape(port):
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        return await r.text()

async def test_outage(relay_world: WorldFactory) -> None:
    world = await relay_world(agencies={"agence-a": AgencySpec(buildings={"bat-1": "c-1", "bat-2": "c-2"}, rate_per_second=20, burst=5)})
    relay = await world.start_relay()
    docs = []
    for i in range(300):
        b = "bat-1" if i % 2 else "bat-2"
        d = world.document(index=i)
        docs.append((b, d))
    t0 = time.monotonic()
    await world.publish(*(world.document_created("agence-a", b, d) for b, d in docs))
    print("published", time.monotonic() - t0)
    await world.wait_until(lambda: len(world.sandbox.documents()) >= 60, timeout=30)
    print("60 uploaded", time.monotonic() - t0)
    world.sandbox.set_faults(outage_seconds=30)
    seen_open = False
    async def watch():
        nonlocal seen_open
        while True:
            text = await scrape(relay.ops_port)
            if 'chouette_relay_circuit_open{agency="agence-a"} 1.0' in text:
                seen_open = True
            await asyncio.sleep(0.2)
    w = asyncio.create_task(watch())
    await world.wait_until(lambda: len(world.sandbox.documents()) >= 300, timeout=90)
    print("all uploaded", time.monotonic() - t0, "early", world.sandbox.early_request_count(), "open", seen_open)
    print(world.sandbox.state()["requests"])
    world.sandbox.set_faults(storm_seconds=12, storm_retry_after_s=2)
    w.cancel()
    text = await scrape(relay.ops_port)
    print([l for l in text.splitlines() if "retries" in l or "circuit" in l or "partner_requests_total" in l])
