"""A record built to be costly to decode costs the relay about its size, and holds nothing back.

The relay runs as a child process (``chouette-relay run``) against the real broker, so that its
memory is its own and its health endpoint is probed from outside its event loop. A manifest part
of 100,000 empty items (about 1 MB) is refused at its first violation: it is dead-lettered once,
``/livez`` answers within a second (never three probes in a row missed), the process grows by
far less than 300 MB, and the building's next manifest is applied.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path

import aiohttp
import orjson
import pytest

from consumer.core.decoding import PoisonReason
from consumer.settings import HttpSettings
from tests.fixtures.relay import AgencySpec, Json, RelayWorld, WorldFactory, uncommitted_records

pytestmark = pytest.mark.integration

AGENCY = "agence-a"
BUILDING = "bat-1"
EMPTY_ITEMS = 100_000
MB = 1024 * 1024
HEADERS = [("event-type", b"manifest-snapshot"), ("schema-version", b"1")]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _memory(process: subprocess.Popen[bytes]) -> dict[str, int]:
    """VmRSS and VmHWM (the peak) of ``process``, in bytes."""
    fields = {}
    with open(f"/proc/{process.pid}/status", encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) * 1024
    return fields


def _empty_items_part(header: Json) -> bytes:
    """``header`` (a manifest part) listing ``EMPTY_ITEMS`` items ``{}``, 10 bytes an item."""
    listed = orjson.dumps({**header, "item_count": EMPTY_ITEMS, "items": []})
    return listed.removesuffix(b"[]}") + b"[" + b",".join([b"{}       "] * EMPTY_ITEMS) + b"]}"


async def _answers(session: aiohttp.ClientSession, url: str) -> bool:
    """Whether ``url`` answers 200 within a second."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=1.0)) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def _probe_livez(url: str, missed: list[int], done: asyncio.Event) -> None:
    """Ask ``url`` every tenth of a second until ``done``, counting the probes not answered."""
    async with aiohttp.ClientSession() as session:
        probe = 0
        while not done.is_set():
            if not await _answers(session, url):
                missed.append(probe)
            probe += 1
            await asyncio.sleep(0.1)  # the probing cadence, as Kubernetes' periodSeconds


def _longest_run(probes: list[int]) -> int:
    """The most consecutive probe numbers in ``probes`` (sorted)."""
    longest, run, previous = 0, 0, None
    for probe in probes:
        run = run + 1 if previous is not None and probe == previous + 1 else 1
        longest, previous = max(longest, run), probe
    return longest


async def _ready(world: RelayWorld, port: int) -> None:
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{port}/readyz"
        await world.wait_until(lambda: _answers(session, url), timeout=60, what="/readyz")


async def test_a_manifest_of_100000_empty_items_is_dead_lettered_once_and_the_relay_stays_live(
    relay_world: WorldFactory, tmp_path: Path
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={BUILDING: "c-1"})})
    port = _free_port()
    process = world.spawn_relay(
        tmp_path / "relay.log", http=HttpSettings(host="127.0.0.1", port=port)
    )
    await _ready(world, port)
    at_ready = _memory(process)["VmRSS"]

    (header,) = world.manifest_parts(AGENCY, BUILDING, [])
    costly = _empty_items_part(header)
    assert 1_000_000 < len(costly) < MB
    listed = world.document(title="Listed after the costly part")
    (next_part,) = world.manifest_parts(AGENCY, BUILDING, [listed])

    missed: list[int] = []
    done = asyncio.Event()
    probing = asyncio.create_task(_probe_livez(f"http://127.0.0.1:{port}/livez", missed, done))
    try:
        key = f"{AGENCY}:{BUILDING}".encode()
        await world.publish_raw(world.manifests_topic, key=key, value=costly, headers=HEADERS)
        await world.publish(next_part)
        await world.wait_until(
            lambda: listed["id"] in world.partner_references("c-1"),
            timeout=60,
            what="the building's next manifest applied",
        )
        # Committed past both parts: a later rebalance cannot read the costly part again.
        await world.wait_until(
            lambda: _all_committed(world), timeout=60, what="the offsets committed"
        )
    finally:
        done.set()
        await probing
    peak = _memory(process)["VmHWM"]

    # A probe may miss once on a loaded machine for reasons of its own; three in a row is what
    # makes Kubernetes restart the pod (failureThreshold), and a relay blocked by the record
    # misses every probe for seconds.
    assert _longest_run(missed) < 3, f"/livez did not answer within a second: probes {missed}"
    (dead_letter,) = await world.dead_letters()
    assert dead_letter["reason"] == PoisonReason.SCHEMA_VIOLATION.value
    assert dead_letter["detail"] == "items[0].id: required but missing"
    assert peak - at_ready < 300 * MB
    assert process.poll() is None


async def _all_committed(world: RelayWorld) -> bool:
    return await uncommitted_records(world) == 0
