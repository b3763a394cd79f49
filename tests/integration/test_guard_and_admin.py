"""The mass-deletion guard and the operator's admin actions on held deletions.

A manifest that would withdraw most of a building (or an empty one) is held: nothing is deleted,
the building shows up in the status, the admin endpoint and the metrics, and stays held across a
restart until an operator releases (deletes exactly those documents) or discards (keeps them)
with the admin bearer token. Documents created by hand in ChouetteCopro are never touched.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from consumer.app.relay import Relay
from consumer.settings import HttpSettings
from tests.fixtures.relay import AgencySpec, Json, RelayWorld, WorldFactory, metric

pytestmark = pytest.mark.integration

AGENCY = "agence-a"
TOKEN = "held-deletions-admin-token"


async def _call(
    relay: Relay, method: str, path: str, *, token: str | None = None
) -> tuple[int, Any]:
    """Status and JSON body of an ops request, with ``Authorization: Bearer token`` if given."""
    assert relay.ops_port is not None
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    url = f"http://127.0.0.1:{relay.ops_port}{path}"
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers) as response,
    ):
        return response.status, await response.json()


async def _held_gauge(relay: Relay, agency: str) -> float | None:
    return await metric(relay, "chouette_relay_held_deletions", agency=agency)


def _token_http(tmp: Path) -> HttpSettings:
    token_file = tmp / "admin-token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    return HttpSettings(host="127.0.0.1", port=0, admin_token_file=token_file)


def _idle(relay: Relay) -> bool:
    return all(p["pending_operations"] == 0 for p in relay.status()["partitions"].values())


def _references(documents: list[Json]) -> dict[str, str]:
    return {d["id"]: d["content"]["sha256"] for d in documents}


def _held(building: str, documents: int) -> list[dict[str, Any]]:
    return [
        {
            "agency": AGENCY,
            "building": building,
            "documents": documents,
            "withdrawals": documents,
            "uploads": 0,
        }
    ]


async def _publish_building(
    world: RelayWorld, relay: Relay, building: str, count: int
) -> list[Json]:
    """``count`` documents published through a manifest taken two hours ago."""
    documents = [world.document() for _ in range(count)]
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    await world.publish(*world.manifest_parts(AGENCY, building, documents, taken_at=taken_at))
    condominium = world.agencies[AGENCY].buildings[building]
    await world.wait_until(
        lambda: world.partner_references(condominium) == _references(documents) and _idle(relay),
        what=f"{count} documents of {building} on the partner",
    )
    return documents


async def _shrink(world: RelayWorld, building: str, kept: list[Json]) -> None:
    """A newer manifest of ``building`` that lists only ``kept``."""
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    await world.publish(*world.manifest_parts(AGENCY, building, kept, taken_at=taken_at))


async def test_held_deletions_survive_a_restart_and_a_release_deletes_exactly_them(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    manual = world.sandbox.seed_manual_document("c-1", "Plan des caves, posé à la main")
    relay = await world.start_relay()  # no admin token configured
    documents = await _publish_building(world, relay, "bat-1", 30)
    kept, withdrawn = documents[:5], documents[5:]

    await _shrink(world, "bat-1", kept)
    await world.wait_until(lambda: relay.held() == _held("bat-1", 25), what="the hold")

    assert world.partner_references("c-1") == _references(documents)
    assert world.sandbox.document(manual) is not None
    assert world.sandbox.request_count("DELETE") == 0
    assert relay.status()["held"] == _held("bat-1", 25)
    # admin actions are disabled without a token
    assert (await _call(relay, "GET", "/admin/held"))[0] == 403
    status, _ = await _call(relay, "POST", "/admin/held/agence-a/bat-1/release", token=TOKEN)
    assert status == 403

    await world.stop_relay(relay)
    relay = await world.start_relay(http=_token_http(world.tmp))

    assert relay.held() == _held("bat-1", 25)
    assert await _call(relay, "GET", "/admin/held", token=TOKEN) == (
        200,
        {"held": _held("bat-1", 25)},
    )
    assert (await _call(relay, "GET", "/admin/held"))[0] == 401
    assert (await _call(relay, "GET", "/admin/held", token="not-the-token"))[0] == 401
    status, _ = await _call(relay, "POST", "/admin/held/agence-a/bat-1/release")
    assert status == 401
    status, _ = await _call(
        relay, "POST", "/admin/held/agence-a/bat-1/release", token="not-the-token"
    )
    assert status == 401
    assert relay.held() == _held("bat-1", 25)
    assert world.sandbox.request_count("DELETE") == 0

    status, body = await _call(relay, "POST", "/admin/held/agence-a/bat-1/release", token=TOKEN)

    assert status == 202  # queued on the commands topic for the replica owning the building
    assert body["action"] == "release"
    await world.wait_until(
        lambda: world.partner_references("c-1") == _references(kept) and _idle(relay),
        what="the released withdrawals",
    )
    assert world.sandbox.request_count("DELETE", 204) == len(withdrawn)
    assert world.sandbox.document(manual) is not None
    assert relay.held() == []
    assert await _call(relay, "GET", "/admin/held", token=TOKEN) == (200, {"held": []})


async def test_held_deletions_show_in_the_metrics(relay_world: WorldFactory) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    relay = await world.start_relay()
    documents = await _publish_building(world, relay, "bat-1", 20)

    await _shrink(world, "bat-1", documents[:4])

    async def gauge_shows_the_hold() -> bool:
        return await _held_gauge(relay, AGENCY) == 16.0

    # the gauge is refreshed every couple of seconds
    await world.wait_until(gauge_shows_the_hold, what="the held deletions gauge", timeout=10)
    assert relay.held() == _held("bat-1", 16)


async def test_discarding_held_deletions_keeps_the_documents(relay_world: WorldFactory) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    relay = await world.start_relay(http=_token_http(world.tmp))
    documents = await _publish_building(world, relay, "bat-1", 30)
    await _shrink(world, "bat-1", documents[:5])
    await world.wait_until(lambda: relay.held() == _held("bat-1", 25), what="the hold")

    status, body = await _call(relay, "POST", "/admin/held/agence-a/bat-1/discard", token=TOKEN)

    assert status == 202
    assert body["action"] == "discard"
    await world.wait_until(lambda: relay.held() == [] and _idle(relay), what="the discard")
    assert world.partner_references("c-1") == _references(documents)
    assert world.sandbox.request_count("DELETE") == 0
    [partition] = [p for p in relay.status()["partitions"].values() if p["documents"]]
    assert partition["by_status"]["published"] == 30
    assert partition["by_status"]["delete_held"] == 0


async def test_an_empty_manifest_is_held_even_for_a_small_building(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(
        agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1", "bat-2": "c-2"})}
    )
    manual = world.sandbox.seed_manual_document("c-1", "Affiche posée à la main")
    relay = await world.start_relay()
    emptied = await _publish_building(world, relay, "bat-1", 3)
    tidied = await _publish_building(world, relay, "bat-2", 3)

    await _shrink(world, "bat-1", [])  # an empty export looks like a building emptied
    await _shrink(world, "bat-2", tidied[:2])  # one withdrawal of a small building goes through

    await world.wait_until(
        lambda: world.partner_references("c-2") == _references(tidied[:2]) and _idle(relay),
        what="the small withdrawal",
    )
    await world.wait_until(lambda: relay.held() == _held("bat-1", 3), what="the hold")
    assert world.partner_references("c-1") == _references(emptied)
    assert world.sandbox.document(manual) is not None
    assert world.sandbox.request_count("DELETE", 204) == 1


async def _cli(world: RelayWorld, *args: str) -> Any:
    """Run ``chouette-relay ARGS`` as an operator would, with the relay's environment."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumer.cli",
        *args,
        env=world.environment(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, err.decode()
    return orjson.loads(out)


async def test_the_cli_lists_and_releases_held_deletions_whichever_replica_owns_them(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    relay = await world.start_relay()
    documents = await _publish_building(world, relay, "bat-1", 24)
    kept = documents[:4]
    await _shrink(world, "bat-1", kept)
    await world.wait_until(lambda: relay.held() == _held("bat-1", 20), what="the hold")

    listed = await _cli(world, "held")
    assert [(h["agency"], h["building"], h["documents"]) for h in listed["held"]] == [
        (AGENCY, "bat-1", 20)
    ]
    queued = await _cli(world, "release", AGENCY, "bat-1")
    assert queued["queued"] == "release"

    await world.wait_until(
        lambda: world.partner_references("c-1") == _references(kept) and _idle(relay),
        what="the released withdrawals",
    )
    assert world.sandbox.request_count("DELETE", 204) == 20
    assert (await _cli(world, "held")) == {"held": []}


async def test_a_malformed_operator_command_is_dead_lettered_and_changes_nothing(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    relay = await world.start_relay()
    documents = await _publish_building(world, relay, "bat-1", 20)
    await _shrink(world, "bat-1", documents[:2])
    await world.wait_until(lambda: relay.held() == _held("bat-1", 18), what="the hold")
    commands_topic = relay.settings.kafka.commands_topic

    await world.publish_raw(commands_topic, key=b"agence-a:bat-1", value=b'{"command": "nuke"}')

    async def dead_lettered() -> bool:
        return any(d["source"]["topic"] == commands_topic for d in await world.dead_letters())

    await world.wait_until(dead_lettered, what="the bad command in the dead-letter topic")
    (letter,) = [d for d in await world.dead_letters() if d["source"]["topic"] == commands_topic]
    assert letter["reason"] == "schema_violation"
    assert relay.held() == _held("bat-1", 18)
    assert world.sandbox.request_count("DELETE") == 0
