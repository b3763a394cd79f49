"""A Kafka broker killed and started again: the relay waits for it, and gives up only past a bound.

These tests run their own broker (a fixed data directory and fixed ports, so that it comes back
with its data after SIGKILL), not the session's: they kill it. The one-minute outage takes about
two minutes; the test of the bound, well under one.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from consumer.local.kafka import LocalKafka, free_port
from consumer.settings import HttpSettings
from tests.fixtures.relay import (
    AgencySpec,
    Json,
    RelayWorld,
    WorldFactory,
    metric,
    uncommitted_records,
)

pytestmark = pytest.mark.integration

OUTAGE_S = 60.0
AGENCY = "agence-a"
BUILDINGS = {"bat-1": "c-1", "bat-2": "c-2", "bat-3": "c-3"}


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """A broker these tests may kill: fixed data directory and ports survive a restart."""
    kafka = LocalKafka(
        data_dir=tmp_path_factory.mktemp("kafka"), port=free_port(), controller_port=free_port()
    )
    with kafka:
        yield kafka


@pytest.fixture
async def kafka_bootstrap(own_broker: LocalKafka) -> str:
    """Overrides the session's broker for this module; brings a killed broker back first."""
    if not own_broker.running:
        await asyncio.to_thread(own_broker.start)
    return own_broker.bootstrap_servers


@pytest.fixture
async def lsc_producer(kafka_bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    """LSC's side: an idempotent producer, which keeps what it is given while the broker is away."""
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    yield producer
    await asyncio.wait_for(producer.stop(), timeout=30)


async def probe(port: int | None, path: str) -> int:
    """The HTTP status of an ops endpoint (503 is an answer, not an error)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status


def documents(world: RelayWorld, count: int) -> list[Json]:
    return [
        world.document_created(AGENCY, building, world.document(inline=index % 2 == 0))
        for index, building in zip(range(count), list(BUILDINGS) * count, strict=False)
    ]


async def send(
    producer: AIOKafkaProducer, world: RelayWorld, events: list[Json]
) -> list[asyncio.Future[object]]:
    """Hand ``events`` to the producer; the returned deliveries resolve once the broker has them."""
    deliveries: list[asyncio.Future[object]] = []
    for event in events:
        deliveries.append(
            await producer.send(
                world.documents_topic,
                value=orjson.dumps(event),
                key=f"{event['agency_id']}:{event['building_id']}".encode(),
                headers=[("event-type", b"document-created"), ("schema-version", b"1")],
            )
        )
    return deliveries


def expected_references(*batches: list[Json]) -> dict[str, str]:
    return {
        e["document"]["id"]: e["document"]["content"]["sha256"] for batch in batches for e in batch
    }


def assert_published_exactly_once(world: RelayWorld, expected: dict[str, str]) -> None:
    assert world.partner_references() == expected
    assert world.sandbox.duplicated_references() == {}
    assert Counter(d.reference for d in world.sandbox.documents()) == dict.fromkeys(expected, 1)
    assert all(world.sandbox.create_count(reference) == 1 for reference in expected)


async def test_a_one_minute_broker_outage_is_waited_out_with_nothing_lost_and_nothing_twice(
    relay_world: WorldFactory, own_broker: LocalKafka, lsc_producer: AIOKafkaProducer
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings=BUILDINGS)}, partitions=3)
    relay = await world.start_relay()
    task = world.relays[-1][1]

    before = documents(world, 12)
    await asyncio.gather(*await send(lsc_producer, world, before))
    await world.wait_until(
        lambda: world.partner_references() == expected_references(before), what="the first batch"
    )

    # Slow partner answers keep uploads in flight when the broker dies: some with their intent
    # written and their outcome not, some read and not started.
    world.sandbox.set_faults(latency_ms=400)
    during = documents(world, 24)
    await asyncio.gather(*await send(lsc_producer, world, during))
    await world.wait_until(
        lambda: len(world.partner_references()) > len(before), what="uploads of the second batch"
    )
    await asyncio.to_thread(own_broker.kill)
    assert len(world.partner_references()) < len(before) + len(during), "nothing left in flight"

    # What LSC publishes meanwhile waits in its producer.
    queued = documents(world, 6)
    queued_deliveries = await send(lsc_producer, world, queued)

    loop = asyncio.get_running_loop()
    outage_ends = loop.time() + OUTAGE_S
    await world.wait_until(
        lambda: not relay.is_ready(), timeout=OUTAGE_S / 2, what="unready during the outage"
    )
    statuses: set[tuple[int, int]] = set()
    while loop.time() < outage_ends:  # the outage itself lasts a minute
        statuses.add(
            (await probe(relay.ops_port, "/readyz"), await probe(relay.ops_port, "/livez"))
        )
        assert not task.done(), "the relay stopped during a one-minute outage"
        await asyncio.sleep(1.0)
    assert statuses == {(503, 200)}

    await asyncio.to_thread(own_broker.start)
    await asyncio.gather(*queued_deliveries)

    async def ready_over_http() -> bool:
        # Read through the probe itself: the group may rebalance once more as the broker comes
        # back, and a relay that rejoins is briefly unready again.
        return await probe(relay.ops_port, "/readyz") == 200

    await world.wait_until(ready_over_http, timeout=120, what="ready again after the outage")
    expected = expected_references(before, during, queued)
    await world.wait_until(
        lambda: world.partner_references() == expected, timeout=120, what="every document"
    )
    assert_published_exactly_once(world, expected)
    await world.wait_until(
        lambda: _all_committed(world), timeout=60, what="offsets committed to the end"
    )
    assert not task.done()
    assert (await metric(relay, "chouette_relay_kafka_retries_total", operation="commit") or 0) > 0
    await world.stop_relay(relay)
    assert relay.failure is None
    assert_published_exactly_once(world, expected)


async def _all_committed(world: RelayWorld) -> bool:
    return await uncommitted_records(world) == 0


async def test_a_broker_gone_longer_than_the_bound_stops_the_relay_with_a_clear_error(
    relay_world: WorldFactory, own_broker: LocalKafka, tmp_path: Path
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings=BUILDINGS)}, partitions=3)
    port = free_port()
    kafka = world.settings().kafka.model_copy(update={"unavailable_timeout_s": 8.0})
    log_path = tmp_path / "relay.log"
    process = world.spawn_relay(
        log_path, kafka=kafka, http=HttpSettings(host="127.0.0.1", port=port)
    )

    async def ready() -> bool:
        try:
            return await probe(port, "/readyz") == 200
        except aiohttp.ClientError:
            return False

    await world.wait_until(ready, timeout=60, what="the relay ready")
    events = documents(world, 3)
    await world.publish(*events)
    await world.wait_until(
        lambda: world.partner_references() == expected_references(events), what="the documents"
    )

    await asyncio.to_thread(own_broker.kill)
    # The bound, then the drain and the bounded stops of the Kafka clients.
    await world.wait_until(lambda: process.poll() is not None, timeout=90, what="the relay's exit")
    assert process.returncode == 1
    lines = [orjson.loads(line) for line in log_path.read_bytes().splitlines() if line[:1] == b"{"]
    fatal = [
        line for line in lines if line.get("msg") == "Kafka unreachable for too long; stopping"
    ]
    assert len(fatal) == 1, "one clear line says why the relay stopped"
    reason = fatal[0]["reason"]
    assert kafka.bootstrap_servers in reason
    assert "CHOUETTE_RELAY_KAFKA__UNAVAILABLE_TIMEOUT_S=8" in reason
