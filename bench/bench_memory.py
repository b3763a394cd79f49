"""Memory of a first publication: the relay process's RSS growth beside the items' own size.

Two first publications in history mode, each against the ChouetteCopro sandbox with limits off
and the relay in a process of its own (``chouette-relay run``), its rate unlimited: one building
of 100,000 documents, and one agency of 50,000 documents across 200 buildings. The relay's
growth is its peak RSS (``VmHWM``) while it publishes, less its RSS once ready; the items' own
size is what the relay cannot do without, measured with tracemalloc in this process: the
snapshot's items decoded, the plan of their uploads and the view entries of their intents.
Targets: growth <= 2x the items' own size, and <= 150 MB for the 100,000-document building.

Run ``python -m bench.bench_memory`` (``--scale 0.1`` for a quick run at a tenth of the sizes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import socket
import sys
import tempfile
import time
import tracemalloc
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.bench_forwarding import sandbox_process
from bench.common import SCALE_VARIABLE, delete_topics, on_a_broker, rss, scale
from consumer.core.decoding import decode_record
from consumer.core.events import ManifestSnapshot
from consumer.core.guard import DeletionGuard
from consumer.core.manifest import ManifestAssembler
from consumer.core.planning.manifests import plan_manifest
from consumer.core.planning.plan import Upload, intent_record
from consumer.core.routing import RoutingTable
from consumer.core.view import PublishedView
from consumer.local.docstore import DocumentStore

AGENCY = "agence-bench"
API_KEY = "bench-key"
ITEMS_PER_PART = 2_000  # about 700 kB a part, under Kafka's 1 MB default
GROWTH_FACTOR_TARGET = 2.0
BUILDING_TARGET_MB = 150.0
MB = 1024 * 1024


@dataclass(frozen=True)
class Scenario:
    name: str
    buildings: int
    documents: int

    def condominium(self, building: int) -> str:
        return f"c-{building}"


@dataclass(frozen=True)
class Result:
    scenario: Scenario
    items_bytes: int
    baseline_rss: int
    peak_rss: int
    seconds: float

    @property
    def growth(self) -> int:
        return self.peak_rss - self.baseline_rss


def _parts(scenario: Scenario, url: str, sha256: str, size: int) -> list[tuple[bytes, bytes]]:
    """Every building's snapshot, as (key, value) records of parts."""
    taken_at = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
    per_building = scenario.documents // scenario.buildings
    records: list[tuple[bytes, bytes]] = []
    for building in range(scenario.buildings):
        items = [
            {
                "id": f"{uuid.uuid4()}:{n}",
                "module": "ag",
                "category": "Documents",
                "title": f"Document {n} of building {building}",
                "document_date": "2024-06-01",
                "audience": "building",
                "content": {
                    "media_type": "application/pdf",
                    "size_bytes": size,
                    "sha256": sha256,
                    "url": url,
                },
            }
            for n in range(per_building)
        ]
        chunks = [items[i : i + ITEMS_PER_PART] for i in range(0, len(items), ITEMS_PER_PART)]
        snapshot = str(uuid.uuid4())
        key = f"{AGENCY}:bat-{building}".encode()
        for number, chunk in enumerate(chunks, start=1):
            value = {
                "schema_version": 1,
                "event_type": "manifest-snapshot",
                "snapshot_id": snapshot,
                "taken_at": taken_at,
                "agency_id": AGENCY,
                "building_id": f"bat-{building}",
                "modules": ["ag"],
                "part": number,
                "parts": len(chunks),
                "item_count": len(items),
                "items": chunk,
            }
            records.append((key, orjson.dumps(value)))
    return records


def _routing_table(scenario: Scenario) -> RoutingTable:
    condominia = {f"bat-{b}": scenario.condominium(b) for b in range(scenario.buildings)}
    agency = {"modules": ["ag"], "first_publication": "history", "approval": "auto"}
    return RoutingTable.from_mapping({"agencies": {AGENCY: {**agency, "condominia": condominia}}})


def _routing(scenario: Scenario) -> str:
    lines = [
        f"[agencies.{AGENCY}]",
        'modules = ["ag"]',
        'first_publication = "history"',
        'approval = "auto"',
        f"[agencies.{AGENCY}.condominia]",
    ]
    lines += [f'"bat-{b}" = "{scenario.condominium(b)}"' for b in range(scenario.buildings)]
    return "\n".join(lines) + "\n"


def items_size(scenario: Scenario, records: list[tuple[bytes, bytes]]) -> int:
    """Bytes the relay must hold at least: decoded items, the plan and the view's intents."""
    routing = _routing_table(scenario)
    guard = DeletionGuard(max_share=0.2, min_count=10)
    now = dt.datetime.now(dt.UTC)
    headers = (("event-type", b"manifest-snapshot"), ("schema-version", b"1"))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    view = PublishedView()
    assembler = ManifestAssembler(expiry=dt.timedelta(hours=1), max_pending_items=1_000_000)
    plans = []
    for offset, (key, value) in enumerate(records):
        part = decode_record(
            topic_kind="manifest-snapshot",
            key=key,
            value=value,
            headers=headers,
            max_value_bytes=1 << 20,
            not_after=now + dt.timedelta(minutes=5),
        )
        if not isinstance(part, ManifestSnapshot):
            raise TypeError(f"the benchmark's own snapshot does not decode: {part}")
        complete = assembler.add(part, offset=offset, now=now).complete
        if complete is not None:
            plan = plan_manifest(view, routing, complete, guard)
            for operation in plan.operations:
                if isinstance(operation, Upload):
                    view.apply(intent_record(operation))
            plans.append((complete, plan))
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    uploads = sum(len(plan.operations) for _, plan in plans)
    if uploads != scenario.documents:
        raise RuntimeError(f"planned {uploads} uploads, expected {scenario.documents}")
    return held


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _create_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(n, num_partitions=3, replication_factor=1) for n in names]
        )
    finally:
        await admin.close()


async def _until(condition: object, what: str, *, timeout_s: float, every_s: float = 0.5) -> None:
    """Poll ``condition`` (a callable returning an awaitable bool) until it holds."""
    deadline = time.monotonic() + timeout_s
    while not await condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(every_s)


async def publish_first(bootstrap: str, scenario: Scenario) -> Result:
    suffix = uuid.uuid4().hex[:10]
    topics = {
        "DOCUMENTS_TOPIC": f"bench.documents.{suffix}",
        "MANIFESTS_TOPIC": f"bench.manifests.{suffix}",
        "STATE_TOPIC": f"bench.view.{suffix}",
        "DEAD_LETTER_TOPIC": f"bench.dead-letter.{suffix}",
        "COMMANDS_TOPIC": f"bench.commands.{suffix}",
    }
    await _create_topics(bootstrap, [topics["DOCUMENTS_TOPIC"], topics["MANIFESTS_TOPIC"]])
    condominia = [scenario.condominium(b) for b in range(scenario.buildings)]
    async with (
        DocumentStore() as store,
        sandbox_process({API_KEY: condominia}) as sandbox_url,
        aiohttp.ClientSession() as http,
    ):
        stored = store.add_pdf("bench", "Benchmark document")
        records = _parts(scenario, stored.url, stored.sha256, stored.size)
        items_bytes = items_size(scenario, records)
        with tempfile.TemporaryDirectory() as tmp:
            keys = Path(tmp) / "keys"
            keys.mkdir()
            (keys / AGENCY).write_text(API_KEY, encoding="utf-8")
            routing = Path(tmp) / "routing.toml"
            routing.write_text(_routing(scenario), encoding="utf-8")
            port = _free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("CHOUETTE_RELAY_")}
            env |= {f"CHOUETTE_RELAY_KAFKA__{name}": topic for name, topic in topics.items()}
            env |= {
                "CHOUETTE_RELAY_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
                "CHOUETTE_RELAY_KAFKA__GROUP_ID": f"bench-{suffix}",
                "CHOUETTE_RELAY_PARTNER__BASE_URL": sandbox_url,
                "CHOUETTE_RELAY_PARTNER__API_KEYS_DIR": str(keys),
                "CHOUETTE_RELAY_PARTNER__CONCURRENCY": "16",
                "CHOUETTE_RELAY_PARTNER__DEFAULT_RATE_PER_SECOND": "1000000",
                "CHOUETTE_RELAY_PARTNER__DEFAULT_BURST": "1000",
                "CHOUETTE_RELAY_CONTENT__ALLOWED_HOSTS": orjson.dumps(
                    [f"127.0.0.1:{store.port}"]
                ).decode(),
                "CHOUETTE_RELAY_ROUTING_FILE": str(routing),
                "CHOUETTE_RELAY_HTTP__HOST": "127.0.0.1",
                "CHOUETTE_RELAY_HTTP__PORT": str(port),
                "CHOUETTE_RELAY_LOG_LEVEL": "WARNING",
                "CHOUETTE_RELAY_LOG_FORMAT": "json",
            }
            relay = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "consumer.cli",
                "run",
                env=env,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            try:

                async def ready() -> bool:
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                            return response.status == 200
                    return False

                await _until(ready, "the relay to be ready", timeout_s=120)
                await asyncio.sleep(2.0)  # let start-up allocations settle before the baseline
                baseline, _ = rss(relay.pid)
                started = time.perf_counter()
                producer = AIOKafkaProducer(
                    bootstrap_servers=bootstrap, max_request_size=4 * MB, linger_ms=20
                )
                await producer.start()
                try:
                    headers = [("event-type", b"manifest-snapshot"), ("schema-version", b"1")]
                    for key, value in records:
                        await producer.send(
                            topics["MANIFESTS_TOPIC"], value=value, key=key, headers=headers
                        )
                    await producer.flush()
                finally:
                    await producer.stop()
                del records

                async def published() -> bool:
                    async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                        text = await response.text()
                    return _done(text) >= scenario.documents

                await _until(published, "the whole publication", timeout_s=3_600, every_s=2.0)
                seconds = time.perf_counter() - started
                _, peak = rss(relay.pid)
            finally:
                relay.terminate()
                await asyncio.wait_for(relay.wait(), timeout=60)
    await delete_topics(bootstrap, list(topics.values()))
    return Result(scenario, items_bytes, baseline, peak, seconds)


def _done(metrics: str) -> float:
    """Backfill uploads the relay finished, from its Prometheus text."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("chouette_relay_first_publication_done_operations_total{")
    )


def show(result: Result) -> None:
    s = result.scenario
    ratio = result.growth / result.items_bytes
    print(
        f"{s.name}: {s.documents:,} documents in {s.buildings} building(s), "
        f"published in {result.seconds:.0f} s",
        flush=True,
    )
    print(
        f"  relay RSS {result.baseline_rss / MB:.0f} MB when ready, peak {result.peak_rss / MB:.0f}"
        f" MB: growth {result.growth / MB:.1f} MB ({result.growth / s.documents:,.0f} B/document)"
    )
    print(
        f"  items' own size {result.items_bytes / MB:.1f} MB "
        f"({result.items_bytes / s.documents:,.0f} B/document); growth / items = {ratio:.2f} "
        f"(target <= {GROWTH_FACTOR_TARGET}: {_verdict(ratio <= GROWTH_FACTOR_TARGET)})"
    )


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=scale(),
        help=f"share of the full sizes (default ${SCALE_VARIABLE}, else 1)",
    )
    args = parser.parse_args(argv)
    scenarios = [
        Scenario("one building", buildings=1, documents=int(100_000 * args.scale)),
        Scenario("one agency", buildings=200, documents=int(50_000 * args.scale) // 200 * 200),
    ]

    async def run(bootstrap: str) -> None:
        for scenario in scenarios:
            result = await publish_first(bootstrap, scenario)
            show(result)
            if scenario.buildings == 1 and args.scale >= 1.0:
                verdict = "met" if result.growth <= BUILDING_TARGET_MB * MB else "NOT met"
                print(f"  growth <= {BUILDING_TARGET_MB:.0f} MB for the building: {verdict}")

    on_a_broker(run)


if __name__ == "__main__":
    main()
