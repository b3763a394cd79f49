"""The published view survives restarts and crashes: it is restored from the changelog.

A restarted relay restores the view it had, is not ready until it has, and sends nothing again;
a relay that takes over the partitions of a killed one restores them and finishes the work with
neither loss nor duplicate. Start-up refuses a state topic whose partition count differs from the
input topics'. Time across topics comes from the events, not from the order they are read in.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka.partitioner import DefaultPartitioner

from consumer.app.relay import Relay
from consumer.core.routing import load_routing
from consumer.core.state import BuildingRecord, DocumentRecord
from consumer.errors import ConfigError
from consumer.kafka.changelog import COMPACTED_TOPIC_CONFIG, Restored, restore_partition
from consumer.local.kafka import create_topics, free_port
from consumer.partner.keys import ApiKeyStore
from consumer.settings import HttpSettings
from tests.fixtures.relay import AgencySpec, Json, RelayWorld, WorldFactory

pytestmark = pytest.mark.integration

AGENCY = "agence-a"


# -- helpers ---------------------------------------------------------------------------------------


async def _http_get(port: int, path: str) -> tuple[int, Any]:
    """Status and JSON body of ``GET path`` on a relay's ops port; (0, None) while it is down."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}{path}") as response,
        ):
            return response.status, await response.json()
    except aiohttp.ClientConnectionError:
        return 0, None


def _views(relay: Relay) -> dict[int, dict[str, DocumentRecord | BuildingRecord | None]]:
    """Every record of every partition's view, by changelog key.

    The status view shows counts only; the restore is judged on the records themselves.
    """
    ingest = relay._ingest
    assert ingest is not None
    views: dict[int, dict[str, DocumentRecord | BuildingRecord | None]] = {}
    for partition, processor in ingest.processors.items():
        view = processor.view
        records: dict[str, DocumentRecord | BuildingRecord | None] = {}
        for place in view.buildings():
            records[place.encode().decode()] = view.building(place.agency_id, place.building_id)
            for record in view.documents(place.agency_id, place.building_id):
                records[record.key.encode().decode()] = record
        views[partition] = records
    return views


def _counts(relay: Relay) -> dict[str, Any]:
    return {p: entry["by_status"] for p, entry in relay.status()["partitions"].items()}


def _events(relay: Relay, kind: str) -> dict[str, float]:
    """Input events of one topic kind the relay handled, by outcome."""
    found: dict[str, float] = {}
    for metric in relay.registry.collect():
        for sample in metric.samples:
            if sample.name == "chouette_relay_events_total" and sample.labels["kind"] == kind:
                found[sample.labels["outcome"]] = sample.value
    return {outcome: n for outcome, n in found.items() if n}


def _idle(relay: Relay) -> bool:
    return all(p["pending_operations"] == 0 for p in relay.status()["partitions"].values())


def _partition_of(building: str, partitions: int) -> int:
    partition: int = DefaultPartitioner()(
        f"{AGENCY}:{building}".encode(), list(range(partitions)), list(range(partitions))
    )
    return partition


async def _publish_buildings(
    world: RelayWorld, buildings: list[str], *, listed: int, live: int
) -> dict[str, str]:
    """Per building: a manifest taken an hour ago listing ``listed`` documents, then ``live``
    document-created events of now. Returns reference -> sha256 of everything to publish."""
    expected: dict[str, str] = {}
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    for building in buildings:
        items = [world.document() for _ in range(listed)]
        later = [world.document() for _ in range(live)]
        await world.publish(*world.manifest_parts(AGENCY, building, items, taken_at=taken_at))
        await world.publish(*(world.document_created(AGENCY, building, d) for d in later))
        expected |= {d["id"]: d["content"]["sha256"] for d in [*items, *later]}
    return expected


@pytest.fixture
def gated_restore(monkeypatch: pytest.MonkeyPatch) -> Iterator[asyncio.Event]:
    """Holds every changelog restore of the relay until the returned event is set."""
    gate = asyncio.Event()

    async def restore_when_open(**arguments: Any) -> Restored:
        await gate.wait()
        return await restore_partition(**arguments)

    monkeypatch.setattr("consumer.app.relay.restore_partition", restore_when_open)
    yield gate
    gate.set()


# -- restart ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "read_again",
    [
        pytest.param(False, id="committed-offsets"),
        pytest.param(True, id="input-read-again-from-the-start"),
    ],
)
async def test_a_restarted_relay_restores_its_view_and_sends_nothing_again(
    relay_world: WorldFactory, gated_restore: asyncio.Event, read_again: bool
) -> None:
    buildings = {f"bat-{n}": f"c-{n}" for n in range(1, 5)}
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings=buildings)})
    gated_restore.set()  # the first relay starts on an empty changelog without waiting
    first = await world.start_relay()
    expected = await _publish_buildings(world, list(buildings), listed=4, live=2)
    await world.wait_until(
        lambda: world.partner_references() == expected and _idle(first),
        what="the first publication",
    )
    before, counts_before = _views(first), _counts(first)
    await world.stop_relay(first)
    requests_before = world.sandbox.request_count()

    gated_restore.clear()
    settings = world.settings()
    if read_again:  # a new consumer group reads every input record again; only the view decides
        kafka = settings.kafka.model_copy(update={"group_id": f"{settings.kafka.group_id}-again"})
        settings = world.settings(kafka=kafka)
    second = Relay(
        settings=settings,
        routing=load_routing(world.routing_file),
        api_keys=ApiKeyStore(world.keys_dir),
    )
    task = asyncio.create_task(second.run(), name="restarted-relay")
    world.relays.append((second, task))
    await world.wait_until(
        lambda: second.ops_port is not None and bool(second.status()["restoring"]),
        what="the restore to begin",
    )
    port = second.ops_port
    assert port is not None
    assert await _http_get(port, "/readyz") == (503, {"ready": False})
    assert (await _http_get(port, "/livez"))[0] == 200
    assert second.status()["ready"] is False

    gated_restore.set()
    await world.wait_until(second.is_ready, what="the restored relay to be ready")
    assert await _http_get(port, "/readyz") == (200, {"ready": True})
    assert (await _http_get(port, "/livez"))[0] == 200
    assert second.status()["restoring"] == {}
    assert _views(second) == before
    assert _counts(second) == counts_before

    # one new document per building: once they are on the partner, every partition is past
    # whatever the restarted relay read again
    sentinels = {b: world.document(title=f"Sentinel {b}") for b in buildings}
    await world.publish(*(world.document_created(AGENCY, b, d) for b, d in sentinels.items()))
    expected |= {d["id"]: d["content"]["sha256"] for d in sentinels.values()}
    await world.wait_until(
        lambda: world.partner_references() == expected and _idle(second),
        what="the sentinels",
    )
    assert world.sandbox.request_count() == requests_before + len(sentinels)
    assert world.sandbox.request_count("POST", 201) == len(expected)
    assert world.sandbox.duplicated_references() == {}
    # what was read again was judged against the restored view, not dropped
    documents_read = _events(second, "document-created")
    assert documents_read.pop("upload") == len(sentinels)
    assert sum(documents_read.values()) == (2 * len(buildings) if read_again else 0)
    manifests_read = _events(second, "manifest-snapshot")
    assert manifests_read == ({"stale": len(buildings)} if read_again else {})


# -- takeover after a crash ------------------------------------------------------------------------


def _log_tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


async def _assigned(port: int) -> set[int] | None:
    """The partitions a ready child relay owns, or None while it is not ready."""
    status, body = await _http_get(port, "/status")
    if status != 200 or not body["ready"]:
        return None
    return {int(p) for p in body["partitions"]}


async def test_a_relay_takes_over_the_partitions_of_a_killed_one_and_finishes_the_work(
    relay_world: WorldFactory,
) -> None:
    partitions = 4
    buildings = {f"bat-{n}": f"c-{n}" for n in range(1, 9)}
    assert len({_partition_of(b, partitions) for b in buildings}) >= 3
    # a slow partner rate keeps work in flight when the first relay is killed
    spec = AgencySpec(buildings=buildings, rate_per_second=8.0, burst=1)
    world = await relay_world(agencies={AGENCY: spec}, partitions=partitions)
    ports = [free_port(), free_port()]
    logs = [world.tmp / "relay-0.log", world.tmp / "relay-1.log"]
    children: list[subprocess.Popen[bytes]] = []
    for port, log in zip(ports, logs, strict=True):
        children.append(world.spawn_relay(log, http=HttpSettings(host="127.0.0.1", port=port)))
    split: list[set[int] | None] = [None, None]

    async def both_own_partitions() -> bool:
        split[:] = [await _assigned(port) for port in ports]
        owned = [s for s in split if s]
        return (
            len(owned) == 2
            and owned[0].isdisjoint(owned[1])
            and (owned[0] | owned[1] == set(range(partitions)))
        )

    try:
        await world.wait_until(both_own_partitions, timeout=60, what="both relays in the group")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_log_tail(logs[0])}\n{_log_tail(logs[1])}") from None
    victim = split[0]
    assert victim is not None

    expected = await _publish_buildings(world, list(buildings), listed=4, live=2)
    victim_condominia = [c for b, c in buildings.items() if _partition_of(b, partitions) in victim]
    assert victim_condominia
    await world.wait_until(
        lambda: sum(len(world.partner_references(c)) for c in victim_condominia) >= 4,
        what="the first relay to be under way",
    )
    world.kill(children[0], signal.SIGKILL)
    done_by_victim = sum(len(world.partner_references(c)) for c in victim_condominia)
    assert done_by_victim < 6 * len(victim_condominia), "the first relay finished before its end"

    try:
        await world.wait_until(
            lambda: world.partner_references() == expected,
            timeout=30,
            what="the surviving relay to finish the work",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_log_tail(logs[1])}") from None
    assert await _assigned(ports[1]) == set(range(partitions))
    assert world.sandbox.duplicated_references() == {}
    assert len(world.sandbox.documents()) == len(expected)
    assert {r: world.sandbox.create_count(r) for r in expected} == dict.fromkeys(expected, 1)

    async def by_status() -> list[dict[str, int]]:
        status, body = await _http_get(ports[1], "/status")
        assert status == 200
        return [p["by_status"] for p in body["partitions"].values()]

    async def all_published() -> bool:
        # The partner answers before the relay records its answer: the view follows at once.
        return sum(s.get("published", 0) for s in await by_status()) == len(expected)

    await world.wait_until(all_published, timeout=10, what="the view to record every answer")
    assert sum(sum(s.values()) for s in await by_status()) == len(expected)


# -- start-up checks -------------------------------------------------------------------------------


async def test_a_state_topic_with_another_partition_count_stops_start_up(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    await create_topics(
        world.bootstrap, [world.state_topic], partitions=2, config=COMPACTED_TOPIC_CONFIG
    )

    with pytest.raises(ConfigError) as raised:
        await world.start_relay()

    message = str(raised.value)
    assert world.state_topic in message
    assert "has 2 partitions" in message
    assert "input topics have 3" in message


# -- time across topics ----------------------------------------------------------------------------


def _published(world: RelayWorld) -> Callable[[Json], bool]:
    return lambda document: document["id"] in world.partner_references()


async def test_an_older_unlisted_document_read_after_the_manifest_is_not_published(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    await world.start_relay()
    published = _published(world)
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)
    listed, unlisted, later = world.document(), world.document(), world.document()

    await world.publish(*world.manifest_parts(AGENCY, "bat-1", [listed], taken_at=taken_at))
    await world.wait_until(lambda: published(listed), what="the listed document")
    # read after the manifest, created before it was taken: the manifest already decided both
    before = taken_at - dt.timedelta(minutes=5)
    await world.publish(
        world.document_created(AGENCY, "bat-1", unlisted, occurred_at=before),
        world.document_created(AGENCY, "bat-1", listed, occurred_at=before),
        world.document_created(AGENCY, "bat-1", later),
    )
    await world.wait_until(lambda: published(later), what="the document created later")

    assert not published(unlisted)
    assert world.partner_references() == {d["id"]: d["content"]["sha256"] for d in (listed, later)}
    assert world.sandbox.create_count(listed["id"]) == 1


async def test_a_document_created_after_the_snapshot_survives_a_manifest_that_omits_it(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    await world.start_relay()
    published = _published(world)
    now = dt.datetime.now(dt.UTC)
    taken_at = now - dt.timedelta(minutes=10)
    older, newer, listed = world.document(), world.document(), world.document()

    await world.publish(
        world.document_created(AGENCY, "bat-1", older, occurred_at=now - dt.timedelta(hours=1)),
        world.document_created(AGENCY, "bat-1", newer, occurred_at=now),
    )
    await world.wait_until(lambda: published(older) and published(newer), what="both uploads")
    # read after both events, taken between them, listing neither
    await world.publish(*world.manifest_parts(AGENCY, "bat-1", [listed], taken_at=taken_at))
    await world.wait_until(
        lambda: published(listed) and not published(older), what="the manifest to apply"
    )

    assert world.partner_references() == {d["id"]: d["content"]["sha256"] for d in (newer, listed)}
