"""Forwarding benchmark: the relay's partner path against a bare HTTP client, and rate fidelity.

Part 1 sends the same multipart uploads to a local ChouetteCopro sandbox (its own process, no
rate limit) twice over, with the same concurrency: once through the relay's partner path
(``OperationExecutor`` + ``Scheduler`` + ``ChouetteCoproClient`` + inline content checks, state
records written to a no-op writer) and once from a bare aiohttp loop posting the same multipart
bodies. Rounds alternate and the median of each side is reported: the rate ratio (target >= 0.8)
and this process's CPU time per upload of the relay's path against the loop's (target <= 1.3x;
the machine may be shared, and CPU time compares where wall time does not).

Part 2 runs a backfill through the ``Scheduler`` at a configured rate with a stub partner call,
while live jobs of the same agency arrive: the sustained rate as a share of the configured one
(target >= 95 %), the most starts in any one-second window (limit: rate + burst) and the p99 wait
of live jobs from submit to start (target <= 1 s).

Part 3 is the memory of a whole backlog waiting: 100,000 uploads of inline PDFs of about 700 B
(a tenth under ``BENCH_SCALE=0.1``), each submitted on its own as a document-created event's plan
is, to an executor whose partner answers slower than they arrive (a rate of one request a
minute), so that all but the window wait. Measured: the RSS growth from before the documents are
decoded until all are queued, split into the decoded documents and what the partner path adds
(target: 300 MB, the relay's whole RSS). It runs in a process of its own unless it is the only
part asked for: a process that ran other benchmarks first grows into the memory they freed.

Run ``python -m bench.bench_forwarding`` (``--help`` for the sizes; ``BENCH_SCALE=0.1``, as
``make bench QUICK=1`` sets it, takes a tenth of each).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import contextlib
import datetime as dt
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
import orjson
from prometheus_client import CollectorRegistry

from bench.common import SCALE_VARIABLE, rss, scale
from consumer.core.events import Document
from consumer.core.planning.plan import Lane, Upload
from consumer.core.records import SourceRecord
from consumer.core.state import DocKey, DocStatus, StateRecord
from consumer.core.view import PublishedView
from consumer.kafka.deadletters import DeadLetterSink
from consumer.local.pdf import make_pdf
from consumer.metrics import RelayMetrics
from consumer.partner.client import ChouetteCoproClient
from consumer.partner.content import ContentFetcher
from consumer.partner.executor import OperationExecutor
from consumer.partner.keys import ApiKeyStore
from consumer.partner.scheduler import RateLimit, Scheduler

AGENCY = "agence-bench"
API_KEY = "bench-key"
CONDOMINIUM = "c-bench"
JSON_API = "application/vnd.api+json"
DISTINCT_PDFS = 64
MAX_BYTES = 1024 * 1024
MB = 1024 * 1024
CPU_TARGET = 1.3
BACKLOG = 100_000
BACKLOG_TARGET_MB = 300.0
PARTS = ("forwarding", "fidelity", "backlog")


# -- part 1: the relay's partner path against a bare client -----------------------------------


@dataclass(frozen=True, slots=True)
class BenchDocument:
    document: Document
    content: bytes


class _NoopWriter:
    """The changelog, minus Kafka: the bench measures the partner path."""

    async def write(self, record: StateRecord) -> None:
        return None

    def submit(self, record: StateRecord) -> asyncio.Future[None]:
        return asyncio.ensure_future(self.write(record))

    async def room(self) -> None:
        return None


class _NoDeadLetters(DeadLetterSink):
    """Every document of the bench is valid; a dead letter would be a bench bug."""

    def __init__(self) -> None:
        pass

    async def send(self, source: SourceRecord, *, reason: str, detail: str) -> None:
        raise RuntimeError(f"unexpected dead letter: {reason}: {detail}")


def make_documents(prefix: str, count: int, pdfs: list[bytes]) -> list[BenchDocument]:
    documents = []
    for number in range(count):
        content = pdfs[number % len(pdfs)]
        document = msgspec.convert(
            {
                "id": f"{prefix}-{number}",
                "module": "ag",
                "category": "Documents",
                "title": f"Document {number}",
                "document_date": "2025-06-01",
                "audience": "building",
                "content": {
                    "media_type": "application/pdf",
                    "size_bytes": len(content),
                    "sha256": hashlib.sha256(content).hexdigest(),
                    "inline_base64": base64.b64encode(content).decode(),
                },
            },
            type=Document,
        )
        documents.append(BenchDocument(document, content))
    return documents


async def forward_through_relay(
    base_url: str, documents: list[BenchDocument], concurrency: int
) -> float:
    """Seconds to upload ``documents`` through executor, scheduler, client and content checks."""
    metrics = RelayMetrics.create(CollectorRegistry(), version="bench")
    source = SourceRecord("bench", 0, 0, 0, None, None, ())
    seen_at = dt.datetime.now(dt.UTC)
    async with (
        ChouetteCoproClient(
            base_url=base_url, api_keys=ApiKeyStore.from_mapping({AGENCY: API_KEY})
        ) as partner,
        ContentFetcher(allowed_hosts=(), max_bytes=MAX_BYTES) as fetcher,
        Scheduler(concurrency=concurrency, default_rate_limit=RateLimit()) as scheduler,
    ):
        view = PublishedView()
        executor = OperationExecutor(
            view=view,
            writer=_NoopWriter(),
            scheduler=scheduler,
            partner=partner,
            content=fetcher,
            dead_letters=_NoDeadLetters(),
            metrics=metrics,
        )
        started = time.perf_counter()
        batch = executor.submit(
            [
                Upload(
                    key=DocKey(AGENCY, "bat-bench", item.document.id),
                    document=item.document,
                    condominium_id=CONDOMINIUM,
                    lane=Lane.LIVE,
                    seen_at=seen_at,
                )
                for item in documents
            ],
            source=source,
        )
        await batch.future
        elapsed = time.perf_counter() - started
    published = sum(1 for record in view.with_status(DocStatus.PUBLISHED))
    if published != len(documents):
        raise RuntimeError("an upload through the relay did not complete")
    return elapsed


async def forward_bare(base_url: str, documents: list[BenchDocument], concurrency: int) -> float:
    """Seconds to send the same multipart uploads from ``concurrency`` plain aiohttp loops."""
    url = f"{base_url}/condominia/{CONDOMINIUM}/documents"
    authorization = "Basic " + base64.b64encode(f"{API_KEY}:".encode()).decode()
    headers = {"Authorization": authorization, "Accept": JSON_API}
    queue = iter(documents)

    async def worker(session: aiohttp.ClientSession) -> None:
        for item in queue:  # the workers share one iterator: each document is sent once
            document = item.document
            attributes = {
                "reference": document.id,
                "title": document.title,
                "category": document.category,
                "document_date": document.document_date.isoformat(),
                "module": document.module.value,
                "audience": document.audience.value,
                "sha256": document.content.sha256,
                "size_bytes": document.content.size_bytes,
            }
            form = aiohttp.FormData()
            resource = {"data": {"type": "documents", "attributes": attributes}}
            form.add_field("data", orjson.dumps(resource).decode(), content_type=JSON_API)
            form.add_field(
                "file", item.content, filename="document.pdf", content_type="application/pdf"
            )
            async with session.post(url, data=form, headers=headers) as response:
                await response.read()
                if response.status != 201:
                    raise RuntimeError(f"bare upload answered {response.status}")

    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with asyncio.TaskGroup() as workers:
            for _ in range(concurrency):
                workers.create_task(worker(session))
        return time.perf_counter() - started


@contextlib.asynccontextmanager
async def sandbox_process(
    accounts_by_key: dict[str, list[str]] | None = None,
) -> AsyncIterator[str]:
    """A sandbox in a process of its own, so that its CPU is not the client's; yields its URL."""
    with tempfile.TemporaryDirectory() as tmp:
        accounts = Path(tmp) / "accounts.json"
        accounts.write_text(
            json.dumps(accounts_by_key or {API_KEY: [CONDOMINIUM]}), encoding="utf-8"
        )
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "consumer.local.sandbox",
            "--port",
            str(port),
            "--accounts-file",
            str(accounts),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await _wait_for_port(port, process)
            yield f"http://127.0.0.1:{port}/api/v1"
        finally:
            if process.returncode is None:
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout=10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _wait_for_port(port: int, process: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise RuntimeError(f"the sandbox exited with {process.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise RuntimeError("the sandbox did not start within 30 s")


@dataclass(slots=True)
class SideResult:
    """Documents/s and this process's CPU milliseconds per document, one entry per round."""

    rates: list[float]
    cpu_ms: list[float]

    def add(self, documents: int, seconds: float, cpu_seconds: float) -> None:
        self.rates.append(documents / seconds)
        self.cpu_ms.append(cpu_seconds * 1000 / documents)

    def line(self, name: str) -> str:
        rounds = ", ".join(f"{rate:.0f}" for rate in self.rates)
        return (
            f"  {name:<19} {statistics.median(self.rates):8.1f} documents/s"
            f"  {statistics.median(self.cpu_ms):5.2f} ms CPU/document  (rounds: {rounds})"
        )


async def bench_forwarding(documents: int, rounds: int, concurrency: int) -> None:
    pdfs = [make_pdf(f"Document {n}", lines=[f"bench {n}"]) for n in range(DISTINCT_PDFS)]
    sides = {"relay": SideResult([], []), "bare": SideResult([], [])}
    runners = {"relay": forward_through_relay, "bare": forward_bare}
    async with sandbox_process() as base_url:
        for side, run in runners.items():  # warm up connections and the sandbox's caches
            await run(base_url, make_documents(f"warm-{side}", 200, pdfs), concurrency)
        for number in range(rounds):
            # Alternate the order so that neither side always meets a fuller sandbox.
            for side in ("relay", "bare") if number % 2 else ("bare", "relay"):
                batch = make_documents(f"{side}-{number}", documents, pdfs)
                cpu = time.process_time()
                seconds = await runners[side](base_url, batch, concurrency)
                sides[side].add(documents, seconds, time.process_time() - cpu)
    ratio = statistics.median(sides["relay"].rates) / statistics.median(sides["bare"].rates)
    cpu = statistics.median(sides["relay"].cpu_ms) / statistics.median(sides["bare"].cpu_ms)
    print(f"forwarding: {documents} documents x {rounds} rounds, concurrency {concurrency}")
    print(sides["bare"].line("bare aiohttp loop"))
    print(sides["relay"].line("relay partner path"))
    print(f"  ratio relay/bare    {ratio:8.2f}   target >= 0.80: {_verdict(ratio >= 0.8)}")
    print(
        f"  CPU per upload      {cpu:8.2f}x  the loop's, target <= {CPU_TARGET}x: "
        f"{_verdict(cpu <= CPU_TARGET)}"
    )


# -- part 2: rate-limit fidelity during a backfill --------------------------------------------


@dataclass(frozen=True, slots=True)
class FidelityResult:
    starts: list[float]
    live_waits: list[float]
    seconds: float


async def run_backfill(
    *, documents: int, rate: float, burst: int, concurrency: int, call_seconds: float
) -> FidelityResult:
    """Submit ``documents`` backfill jobs at once, and a live job every 100 ms meanwhile."""
    starts: list[float] = []
    live_waits: list[float] = []

    async def partner_call() -> None:
        starts.append(time.monotonic())
        await asyncio.sleep(call_seconds)

    def live_job(submitted: float) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            live_waits.append(time.monotonic() - submitted)
            await partner_call()

        return call

    limit = RateLimit(rate_per_second=rate, burst=burst)
    async with Scheduler(concurrency=concurrency, default_rate_limit=limit) as scheduler:
        began = time.monotonic()
        backfill = [
            scheduler.submit(partner_call, agency_id=AGENCY, lane=Lane.BACKFILL)
            for _ in range(documents)
        ]
        live = []
        pending = asyncio.gather(*backfill)
        while not pending.done():
            submitted = time.monotonic()
            live.append(scheduler.submit(live_job(submitted), agency_id=AGENCY, lane=Lane.LIVE))
            await asyncio.wait({pending}, timeout=0.1)
        await pending
        await asyncio.gather(*live)
        seconds = time.monotonic() - began
    return FidelityResult(sorted(starts), live_waits, seconds)


def max_in_window(starts: list[float], window: float = 1.0) -> int:
    """The most starts in any half-open window ``[t, t + window)``."""
    best = 0
    for index, start in enumerate(starts):
        best = max(best, bisect.bisect_left(starts, start + window, lo=index) - index)
    return best


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def bench_fidelity(documents: int, rate: float, burst: int, concurrency: int) -> None:
    result = await run_backfill(
        documents=documents, rate=rate, burst=burst, concurrency=concurrency, call_seconds=0.02
    )
    starts = result.starts
    # A full bucket lets ``burst`` go at once; the rest is paced at ``rate``.
    sustained = (len(starts) - burst) / (starts[-1] - starts[0])
    share = sustained / rate
    peak = max_in_window(starts)
    p99 = percentile(result.live_waits, 0.99)
    print(
        f"rate fidelity: {documents} backfill + {len(result.live_waits)} live jobs, "
        f"rate {rate:g}/s burst {burst}, concurrency {concurrency}, {result.seconds:.1f} s"
    )
    print(
        f"  sustained rate      {sustained:8.1f} /s = {share:6.1%}   target >= 95%: "
        f"{_verdict(share >= 0.95)}"
    )
    print(
        f"  max starts in 1 s   {peak:8d}      limit {rate + burst:g}: "
        f"{_verdict(peak <= rate + burst)}"
    )
    print(
        f"  live wait p99       {p99 * 1000:8.1f} ms   target <= 1000 ms: {_verdict(p99 <= 1.0)}"
        f"  (max {max(result.live_waits) * 1000:.1f} ms)"
    )


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


# -- part 3: the memory of a whole backlog waiting --------------------------------------------


async def bench_backlog(documents: int, concurrency: int) -> None:
    """RSS growth while ``documents`` uploads, each its own plan, wait for a slow partner."""
    pdfs = [make_pdf(f"Document {n}", lines=[f"backlog {n}"]) for n in range(DISTINCT_PDFS)]
    metrics = RelayMetrics.create(CollectorRegistry(), version="bench")
    seen_at = dt.datetime.now(dt.UTC)
    slow = RateLimit(rate_per_second=1 / 60, burst=1)
    async with (
        sandbox_process() as base_url,
        ChouetteCoproClient(
            base_url=base_url, api_keys=ApiKeyStore.from_mapping({AGENCY: API_KEY})
        ) as partner,
        ContentFetcher(allowed_hosts=(), max_bytes=MAX_BYTES) as fetcher,
        Scheduler(concurrency=concurrency, default_rate_limit=slow) as scheduler,
    ):
        executor = OperationExecutor(
            view=PublishedView(),
            writer=_NoopWriter(),
            scheduler=scheduler,
            partner=partner,
            content=fetcher,
            dead_letters=_NoDeadLetters(),
            metrics=metrics,
        )
        before, _ = rss(os.getpid())
        started = time.perf_counter()
        decoded = make_documents("backlog", documents, pdfs)
        with_documents, _ = rss(os.getpid())
        batches = []
        for offset, item in enumerate(decoded):
            upload = Upload(
                key=DocKey(AGENCY, f"bat-{offset % 125}", item.document.id),
                document=item.document,
                condominium_id=CONDOMINIUM,
                lane=Lane.LIVE,
                seen_at=seen_at,
            )
            source = SourceRecord("bench", offset % 6, offset, 0, None, None, ())
            batches.append(executor.submit([upload], source=source))
        await asyncio.sleep(1.0)  # the window's chains start and wait for the rate
        queued, _ = rss(os.getpid())
        seconds = time.perf_counter() - started
        waiting = sum(not batch.future.done() for batch in batches)
        await executor.cancel_all()
    growth = (queued - before) / MB
    print(
        f"backlog: {documents:,} uploads queued in {seconds:.1f} s, {waiting:,} still waiting; "
        f"RSS growth {growth:.1f} MB ({(queued - before) / documents:,.0f} B an upload): "
        f"the decoded documents {(with_documents - before) / MB:.1f} MB, "
        f"queued in the partner path {(queued - with_documents) / MB:.1f} MB"
    )
    print(f"  target <= {BACKLOG_TARGET_MB:.0f} MB: {_verdict(growth <= BACKLOG_TARGET_MB)}")


def backlog_in_a_process(documents: int, concurrency: int) -> None:
    """Part 3 in a fresh interpreter: RSS grows there from nothing, not into what earlier
    benchmarks of the same process freed."""
    sys.stdout.flush()  # what this process printed comes before the child's lines
    subprocess.run(  # noqa: S603 - this interpreter and this module, fixed arguments
        [
            sys.executable,
            "-m",
            "bench.bench_forwarding",
            "--parts",
            "backlog",
            "--backlog",
            str(documents),
            "--concurrency",
            str(concurrency),
        ],
        check=True,
    )


# -- entry point ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_forwarding",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    share = scale()
    parser.add_argument(
        "--documents",
        type=int,
        default=max(100, int(1500 * share)),
        help=f"uploads per side and round (default 1,500, times ${SCALE_VARIABLE} when set)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--backfill",
        type=int,
        default=max(1_000, int(20_000 * share)),
        help=f"backfill jobs (part 2; default 20,000, times ${SCALE_VARIABLE} when set)",
    )
    parser.add_argument("--rate", type=float, default=200.0, help="configured requests/s")
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument(
        "--backlog",
        type=int,
        default=max(1, int(BACKLOG * share)),
        help=f"uploads waiting (part 3; default {BACKLOG:,}, times ${SCALE_VARIABLE} when set)",
    )
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    args = parser.parse_args(list(argv) if argv is not None else [])
    if "forwarding" in args.parts:
        asyncio.run(bench_forwarding(args.documents, args.rounds, args.concurrency))
    if "fidelity" in args.parts:
        asyncio.run(bench_fidelity(args.backfill, args.rate, args.burst, args.concurrency))
    if args.parts == ["backlog"]:
        asyncio.run(bench_backlog(args.backlog, args.concurrency))
    elif "backlog" in args.parts:
        backlog_in_a_process(args.backlog, args.concurrency)


if __name__ == "__main__":
    main(sys.argv[1:])
