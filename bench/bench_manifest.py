"""A large manifest: one building's 100,000-item snapshot, taken by a relay on a real broker.

The relay runs as a process of its own (``chouette-relay run``) with its default settings (session
timeout, commit interval, state writes) and the ChouetteCopro sandbox as its partner (a process of
its own too, no rate limit; the relay's own rate is a generous 1,000 requests a second), its
documents served by the document store in this process. Once it is ready, the snapshot is
published in parts of 2,000 items, in two modes of first publication:
``fresh`` (every item becomes a baseline state record; nothing is sent) and ``history`` (every item
is uploaded to the sandbox). The relay has converged when its consumer group has committed every
part's offset: the offset is released only once the manifest's work is done and its building
record written. Measured:
- the seconds from the first part published to convergence (target: 60 s), and the CPU time the
  relay spent meanwhile, which a loaded machine does not stretch;
- the relay's RSS growth: its peak (``VmHWM``) less its RSS once ready (target: 300 MB);
- the worst ``/livez`` answer time, asked every 0.2 s from a thread of this process from ready to
  convergence, so that the document store's work on this process's event loop does not delay the
  measure (target: 1 s; an answer later than 10 s counts as a failure);
- the relay's own loop-lag ticks (``event_loop_tick_lag_seconds``) that fired more than 1 s late;
- how often the group assigned partitions, and Kafka writes sent again, from the relay's log.
The 60 s and 300 MB targets are judged at the full size only; at a smaller one they are printed
beside it. An upload, its content fetched from the document store, costs the relay milliseconds
of CPU, so the history mode of 100,000 items takes minutes whatever the runtime: its time is the
upload rate's.

Run ``python -m bench.bench_manifest [--items N] [--modes fresh history]``; ``BENCH_SCALE=0.1``
(``make bench QUICK=1``) takes a tenth of the items. The broker is the one named by
``CHOUETTE_RELAY_TEST_KAFKA``, or a local one started for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from asyncio.subprocess import Process
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from bench.bench_forwarding import sandbox_process
from bench.common import SCALE_VARIABLE, cpu_seconds, delete_topics, on_a_broker, rss, scale
from consumer.local.docstore import DocumentStore
from consumer.local.kafka import create_topics, free_port

ITEMS = 100_000
ITEMS_PER_PART = 2_000  # about 700 kB a part, under Kafka's 1 MB default
MODES = ("fresh", "history")
AGENCY = "agence-bench"
BUILDING = "bat-1"
CONDOMINIUM = "c-1"
API_KEY = "bench-key"
PARTITIONS = 3
SECONDS_TARGET = 60.0
GROWTH_TARGET_MB = 300.0
LIVEZ_TARGET_S = 1.0
PROBE_EVERY_S = 0.2
PROBE_TIMEOUT_S = 10.0
MB = 1024 * 1024


@dataclass(frozen=True)
class Result:
    mode: str
    items: int
    converged: bool
    seconds: float
    cpu_seconds: float  # the relay's, from the first part published to convergence
    baseline_rss: int
    peak_rss: int
    probe: LivenessProbe
    started: float  # when the first part was published (``time.perf_counter()``)
    assignments: int
    resends: int
    state_records: int
    late_ticks: Ticks  # the relay's own loop-lag ticks from ready to convergence

    @property
    def growth(self) -> int:
        return self.peak_rss - self.baseline_rss


@dataclass(frozen=True)
class Ticks:
    """The relay's loop-lag ticks (``event_loop_tick_lag_seconds``): all, and those over 1 s."""

    count: int
    late: int

    def __sub__(self, earlier: Ticks) -> Ticks:
        return Ticks(self.count - earlier.count, self.late - earlier.late)


async def _ticks(http: aiohttp.ClientSession, port: int) -> Ticks:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    count = on_time = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "chouette_relay_event_loop_tick_lag_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_bucket") and float(sample.labels["le"]) == LIVEZ_TARGET_S:
                on_time = sample.value
    return Ticks(int(count), int(count - on_time))


class LivenessProbe:
    """Asks ``/livez`` every ``every_s`` until stopped, keeping the worst answer time.

    It runs in a thread of its own with a blocking client: the bench's event loop also serves the
    document store, and a probe on that loop would count the bench's own delays as the relay's.
    """

    def __init__(self, url: str, *, every_s: float, timeout_s: float) -> None:
        self._url = url
        self._every_s = every_s
        self._timeout_s = timeout_s
        self.answers = 0
        self.failures = 0
        self.worst_s = 0.0
        self.worst_at = 0.0  # when the worst answer was asked (``time.perf_counter()``)

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self._every_s):
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(  # noqa: S310 - a loopback http URL the bench built
                    self._url, timeout=self._timeout_s
                ) as answer:
                    answer.read()
                    alive = answer.status == 200
            except OSError:  # refused, timed out, or an HTTP error status
                alive = False
            took = time.perf_counter() - started
            if took > self.worst_s:
                self.worst_s, self.worst_at = took, started
            self.answers += 1
            self.failures += not alive


@contextlib.asynccontextmanager
async def probing(url: str) -> AsyncIterator[LivenessProbe]:
    """A ``LivenessProbe`` of ``url`` in its thread, from entry to exit."""
    probe = LivenessProbe(url, every_s=PROBE_EVERY_S, timeout_s=PROBE_TIMEOUT_S)
    stop = threading.Event()
    asking = asyncio.create_task(asyncio.to_thread(probe.run, stop))
    try:
        yield probe
    finally:
        stop.set()
        await asking


def manifest_parts(items: int, url: str, sha256: str, size: int) -> list[tuple[bytes, bytes]]:
    """The building's snapshot of ``items`` documents, as (key, value) records of its parts."""
    taken_at = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
    documents = [
        {
            "id": f"{uuid.UUID(int=n * 2_654_435_761 % 2**128)}:att-{n % 3}",
            "module": "ag",
            "category": "Documents",
            "title": f"Document {n} of the building",
            "document_date": "2024-06-01",
            "audience": "building",
            "content": {
                "media_type": "application/pdf",
                "size_bytes": size,
                "sha256": sha256,
                "url": url,
            },
        }
        for n in range(items)
    ]
    chunks = [documents[i : i + ITEMS_PER_PART] for i in range(0, items, ITEMS_PER_PART)]
    snapshot = str(uuid.uuid4())
    key = f"{AGENCY}:{BUILDING}".encode()
    return [
        (
            key,
            orjson.dumps(
                {
                    "schema_version": 1,
                    "event_type": "manifest-snapshot",
                    "snapshot_id": snapshot,
                    "taken_at": taken_at,
                    "agency_id": AGENCY,
                    "building_id": BUILDING,
                    "modules": ["ag"],
                    "part": number,
                    "parts": len(chunks),
                    "item_count": items,
                    "items": chunk,
                }
            ),
        )
        for number, chunk in enumerate(chunks, start=1)
    ]


def _write_config(tmp: Path, mode: str) -> None:
    """The agency's API key and the routing file, in ``tmp``."""
    (tmp / "keys").mkdir()
    (tmp / "keys" / AGENCY).write_text(API_KEY, encoding="utf-8")
    (tmp / "routing.toml").write_text(_routing(mode), encoding="utf-8")


def _routing(mode: str) -> str:
    return "\n".join(
        [
            f"[agencies.{AGENCY}]",
            'modules = ["ag"]',
            f'first_publication = "{mode}"',
            'approval = "auto"',
            f"[agencies.{AGENCY}.condominia]",
            f'"{BUILDING}" = "{CONDOMINIUM}"',
            "",
        ]
    )


async def _until(
    condition: Callable[[], Awaitable[bool]], what: str, *, timeout_s: float, every_s: float
) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout_s`` passed (False)."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            print(f"  gave up waiting for {what} after {timeout_s:.0f} s", flush=True)
            return False
        await asyncio.sleep(every_s)
    return True


async def _uncommitted(reader: AIOKafkaConsumer, partitions: list[TopicPartition]) -> int:
    """Records of ``partitions`` the relay's group has not committed yet."""
    ends = await reader.end_offsets(partitions)
    behind = 0
    for tp in partitions:
        committed: int | None = await reader.committed(tp)
        behind += ends[tp] - (committed or 0)
    return behind


async def _records_in(reader: AIOKafkaConsumer, topic: str) -> int:
    """Records written to ``topic`` so far (the sum of its end offsets)."""
    partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    return sum((await reader.end_offsets(partitions)).values())


def _count_lines(log: Path, message: str) -> int:
    needle = orjson.dumps(message)
    with log.open("rb") as lines:
        return sum(1 for line in lines if needle in line)


def _environment(
    bootstrap: str,
    topics: dict[str, str],
    group: str,
    *,
    partner: str,
    store: int,
    port: int,
    tmp: Path,
) -> dict[str, str]:
    """The relay's settings: its defaults, but for where things are and a generous rate."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHOUETTE_RELAY_")}
    env |= {f"CHOUETTE_RELAY_KAFKA__{name}": topic for name, topic in topics.items()}
    return env | {
        "CHOUETTE_RELAY_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "CHOUETTE_RELAY_KAFKA__GROUP_ID": group,
        "CHOUETTE_RELAY_PARTNER__BASE_URL": partner,
        "CHOUETTE_RELAY_PARTNER__API_KEYS_DIR": str(tmp / "keys"),
        "CHOUETTE_RELAY_PARTNER__DEFAULT_RATE_PER_SECOND": "1000",
        "CHOUETTE_RELAY_PARTNER__DEFAULT_BURST": "100",
        "CHOUETTE_RELAY_CONTENT__ALLOWED_HOSTS": orjson.dumps([f"127.0.0.1:{store}"]).decode(),
        "CHOUETTE_RELAY_ROUTING_FILE": str(tmp / "routing.toml"),
        "CHOUETTE_RELAY_HTTP__HOST": "127.0.0.1",
        "CHOUETTE_RELAY_HTTP__PORT": str(port),
        "CHOUETTE_RELAY_LOG_FORMAT": "json",
    }


@contextlib.asynccontextmanager
async def relay_process(env: dict[str, str], log: Path) -> AsyncIterator[Process]:
    """``chouette-relay run`` in a process of its own, its log in ``log``; stopped on exit."""
    with log.open("wb") as out:
        relay = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "consumer.cli", "run", env=env, stdout=out, stderr=out
        )
    try:
        yield relay
    finally:
        if relay.returncode is None:
            relay.terminate()
        try:
            await asyncio.wait_for(relay.wait(), timeout=60)
        except TimeoutError:
            relay.kill()
            await relay.wait()


async def _publish(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=4 * MB, linger_ms=20)
    await producer.start()
    try:
        headers = [("event-type", b"manifest-snapshot"), ("schema-version", b"1")]
        for key, value in records:
            await producer.send(topic, value=value, key=key, headers=headers)
        await producer.flush()
    finally:
        await producer.stop()


async def take_manifest(bootstrap: str, mode: str, items: int, timeout_s: float) -> Result:
    """Start a relay, publish the manifest, and measure it until the relay has converged."""
    suffix = uuid.uuid4().hex[:10]
    topics = {
        "DOCUMENTS_TOPIC": f"bench.documents.{suffix}",
        "MANIFESTS_TOPIC": f"bench.manifests.{suffix}",
        "STATE_TOPIC": f"bench.view.{suffix}",
        "DEAD_LETTER_TOPIC": f"bench.dead-letter.{suffix}",
        "COMMANDS_TOPIC": f"bench.commands.{suffix}",
    }
    group = f"bench-{suffix}"
    manifests = topics["MANIFESTS_TOPIC"]
    await create_topics(bootstrap, [topics["DOCUMENTS_TOPIC"], manifests], partitions=PARTITIONS)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(delete_topics, bootstrap, list(topics.values()))
        store = await stack.enter_async_context(DocumentStore())
        partner = await stack.enter_async_context(sandbox_process({API_KEY: [CONDOMINIUM]}))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        stored = store.add_pdf("bench", "Benchmark document")
        records = manifest_parts(items, stored.url, stored.sha256, stored.size)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        _write_config(tmp, mode)
        port = free_port()
        env = _environment(
            bootstrap, topics, group, partner=partner, store=store.port, port=port, tmp=tmp
        )
        log = tmp / "relay.log"
        relay = await stack.enter_async_context(relay_process(env, log))

        def running() -> None:
            if relay.returncode is not None:
                raise RuntimeError(f"the relay exited with {relay.returncode}: {log.read_text()}")

        async def ready() -> bool:
            running()
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                    return response.status == 200
            return False

        if not await _until(ready, "the relay to be ready", timeout_s=120, every_s=0.5):
            raise RuntimeError("the relay did not become ready")
        await asyncio.sleep(2.0)  # let start-up allocations settle before the baseline
        baseline, _ = rss(relay.pid)
        ticks_when_ready = await _ticks(http, port)
        reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
        await reader.start()
        stack.push_async_callback(reader.stop)
        partitions = [TopicPartition(manifests, p) for p in range(PARTITIONS)]

        async def converged() -> bool:
            running()
            return await _uncommitted(reader, partitions) == 0

        async with probing(f"http://127.0.0.1:{port}/livez") as probe:
            started, cpu = time.perf_counter(), cpu_seconds(relay.pid)
            await _publish(bootstrap, manifests, records)
            del records
            done = await _until(converged, "convergence", timeout_s=timeout_s, every_s=0.5)
            seconds = time.perf_counter() - started
            relay_cpu = cpu_seconds(relay.pid) - cpu
            _, peak = rss(relay.pid)
            written = await _records_in(reader, topics["STATE_TOPIC"])
            ticks = await _ticks(http, port) - ticks_when_ready
        return Result(
            mode=mode,
            items=items,
            converged=done,
            seconds=seconds,
            cpu_seconds=relay_cpu,
            baseline_rss=baseline,
            peak_rss=peak,
            probe=probe,
            started=started,
            assignments=_count_lines(log, "partitions assigned"),
            resends=_count_lines(log, "Kafka write failed; sending again"),
            state_records=written,
            late_ticks=ticks,
        )


def show(result: Result, *, full_size: bool) -> None:
    def verdict(met: bool) -> str:
        if not full_size:
            return "judged at full size"
        return "met" if met else "NOT met"

    probe = result.probe
    took = "converged" if result.converged else "had NOT converged"
    print(f"{result.mode}: {result.items:,} items of one building", flush=True)
    print(
        f"  {took} in {result.seconds:.1f} s, the relay using {result.cpu_seconds:.1f} s of CPU "
        f"(target <= {SECONDS_TARGET:.0f} s: {verdict(result.converged and result.seconds <= 60)})"
    )
    print(
        f"  relay RSS {result.baseline_rss / MB:.0f} MB when ready, peak "
        f"{result.peak_rss / MB:.0f} MB: growth {result.growth / MB:.1f} MB "
        f"({result.growth / result.items:,.0f} B an item; target <= {GROWTH_TARGET_MB:.0f} MB: "
        f"{verdict(result.growth <= GROWTH_TARGET_MB * MB)})"
    )
    livez_met = probe.failures == 0 and probe.worst_s <= LIVEZ_TARGET_S
    print(
        f"  /livez worst answer {probe.worst_s * 1000:.0f} ms "
        f"({probe.worst_at - result.started:.1f} s after the first part), {probe.answers} probes, "
        f"{probe.failures} failed (target <= {LIVEZ_TARGET_S * 1000:.0f} ms: "
        f"{'met' if livez_met else 'NOT met'})"
    )
    print(
        f"  the relay's own loop-lag ticks: {result.late_ticks.late} of "
        f"{result.late_ticks.count} fired more than {LIVEZ_TARGET_S:.0f} s late"
    )
    print(
        f"  partitions assigned {result.assignments} time(s) "
        f"({max(result.assignments - 1, 0)} rebalance(s)); "
        f"Kafka writes sent again: {result.resends}; state records written: "
        f"{result.state_records:,}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_manifest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    share = scale()
    parser.add_argument(
        "--items",
        type=int,
        default=max(1, int(ITEMS * share)),
        help=f"items of the manifest (default {ITEMS:,}, times ${SCALE_VARIABLE} when set)",
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--timeout", type=float, default=3_600.0, help="seconds to wait for convergence"
    )
    args = parser.parse_args(list(argv) if argv is not None else [])

    async def run(bootstrap: str) -> None:
        for mode in args.modes:
            result = await take_manifest(bootstrap, mode, args.items, args.timeout)
            show(result, full_size=args.items >= ITEMS)

    on_a_broker(run)


if __name__ == "__main__":
    main(sys.argv[1:])
