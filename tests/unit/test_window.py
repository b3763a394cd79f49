"""The executor's window: a large plan waits as items, and the guarantees hold while it flows.

At most the window's chains run per partition however large the plan; the rest costs no task.
Operations on one document still run in plan order, live work finds room beside a backfill that
fills the window, one agency does not take the window from another, and a paused agency's
work takes no room and is held rather than pending; a plan's record of a document with work
queued is written behind that work. A real scheduler; partner and content
stand-ins whose answers the test releases.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from typing import cast

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from consumer.core.events import Content, Document
from consumer.core.planning.plan import Lane, Upload
from consumer.core.records import SourceRecord
from consumer.core.state import DocKey, DocStatus, DocumentRecord, StateRecord, Tombstone
from consumer.core.view import PublishedView
from consumer.kafka.deadletters import DeadLetterSink
from consumer.metrics import RelayMetrics
from consumer.partner.answers import RemoteDocument
from consumer.partner.client import ChouetteCoproClient
from consumer.partner.content import ContentStage
from consumer.partner.executor import OperationExecutor
from consumer.partner.scheduler import RateLimit, Scheduler
from tests.writers import WritesAtOnce

SOURCE = SourceRecord("manifests", 0, 7, 0, b"a:b", b"{}", ())
UNLIMITED = RateLimit(rate_per_second=1e9, burst=1_000_000)


class Changelog(WritesAtOnce):
    async def write(self, record: StateRecord) -> None:
        return None


class WrittenInOrder(WritesAtOnce):
    """The changelog as a list: what a relay started after a crash would restore, in order."""

    def __init__(self) -> None:
        self.records: list[StateRecord] = []

    async def write(self, record: StateRecord) -> None:
        self.records.append(record)


class Store:
    async def fetch(self, content: Content) -> bytes:
        return b"%PDF"


class Partner:
    """Answers each upload once the test opens the gate; remembers the order of calls."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.calls: list[tuple[str, str]] = []  # (document id, sha256), in call order
        self.started = 0

    def redact(self, text: str) -> str:
        return text

    async def upload(
        self, *, agency_id: str, condominium_id: str, document: Document, content: bytes
    ) -> RemoteDocument:
        self.started += 1
        await self.gate.wait()
        self.calls.append((document.id, document.content.sha256))
        return RemoteDocument(f"r-{document.id}", document.id, document.content.sha256)

    async def update(
        self, *, agency_id: str, remote_id: str, document: Document, content: bytes
    ) -> RemoteDocument:
        return await self.upload(
            agency_id=agency_id, condominium_id="", document=document, content=content
        )


def written(record: StateRecord) -> str:
    """A record of ``upload``'s documents, told by its status and body."""
    if isinstance(record, DocumentRecord):
        body = "v1" if record.sha256 == hashlib.sha256(b"v1").hexdigest() else "v2"
        return f"{record.status} {body}"
    return "tombstone"


def upload(agency: str, number: int, *, lane: Lane = Lane.BACKFILL, body: str = "v1") -> Upload:
    document = msgspec.convert(
        {
            "id": f"doc-{number}",
            "module": "ag",
            "category": "PV",
            "title": "PV AG",
            "document_date": "2025-01-01",
            "audience": "building",
            "content": {
                "media_type": "application/pdf",
                "size_bytes": 4,
                "sha256": hashlib.sha256(body.encode()).hexdigest(),
                "url": "https://lsc.example/d.pdf",
            },
        },
        type=Document,
    )
    key = DocKey(agency, "bat-1", document.id)
    return Upload(key, document, "c-1", lane, dt.datetime(2025, 1, 1, tzinfo=dt.UTC))


@pytest.fixture
async def scheduler() -> AsyncIterator[Scheduler]:
    async with Scheduler(concurrency=4, default_rate_limit=UNLIMITED) as running:
        yield running


def executor_with(
    scheduler: Scheduler,
    partner: Partner,
    *,
    window: int,
    view: PublishedView | None = None,
    writer: Changelog | WrittenInOrder | None = None,
) -> OperationExecutor:
    return OperationExecutor(
        view=view or PublishedView(),
        writer=writer or Changelog(),
        scheduler=scheduler,
        partner=cast(ChouetteCoproClient, partner),
        content=ContentStage(fetch=Store().fetch, per_agency=8),
        dead_letters=cast(DeadLetterSink, None),
        metrics=RelayMetrics.create(CollectorRegistry(), version="test"),
        window=window,
    )


async def eventually(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` until it holds, failing the test after a generous deadline."""
    deadline = time.monotonic() + 10
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.002)


async def test_a_large_plan_runs_through_the_window_with_no_task_per_queued_operation(
    scheduler: Scheduler,
) -> None:
    partner = Partner()
    partner.gate.clear()
    view = PublishedView()
    executor = executor_with(scheduler, partner, window=16, view=view)
    tasks_before = len(asyncio.all_tasks())

    batch = executor.submit([upload("a", n) for n in range(5_000)], source=SOURCE)
    await eventually(lambda: partner.started == 3)  # every backfill worker of the scheduler busy

    assert len(asyncio.all_tasks()) - tasks_before <= 16
    assert executor.pending == 5_000
    assert not batch.future.done()  # its offsets wait for the last operation
    partner.gate.set()
    await batch.future
    assert len(partner.calls) == 5_000
    assert executor.pending == 0
    assert sum(1 for _ in view.with_status(DocStatus.PUBLISHED)) == 5_000


async def test_operations_on_one_document_run_in_plan_order_even_across_lanes(
    scheduler: Scheduler,
) -> None:
    partner = Partner()
    partner.gate.clear()
    executor = executor_with(scheduler, partner, window=1)
    backfill = executor.submit(
        [upload("a", n) for n in range(3)], source=SOURCE
    )  # doc-0 runs, doc-1 and doc-2 wait in the queue
    await eventually(lambda: partner.started == 1)
    # A live change of doc-2, planned after the backfill's: it must not overtake it.
    live = executor.submit([upload("a", 2, lane=Lane.LIVE, body="v2")], source=SOURCE)
    partner.gate.set()
    await asyncio.gather(backfill.future, live.future)

    doc_2 = [sha for document, sha in partner.calls if document == "doc-2"]
    assert doc_2 == [hashlib.sha256(b"v1").hexdigest(), hashlib.sha256(b"v2").hexdigest()]


async def test_a_record_of_a_document_with_work_queued_is_written_behind_that_work(
    scheduler: Scheduler,
) -> None:
    partner = Partner()
    partner.gate.clear()
    changelog = WrittenInOrder()
    executor = executor_with(scheduler, partner, window=4, writer=changelog)
    first = executor.submit([upload("a", 1)], source=SOURCE)
    await eventually(lambda: partner.started == 1)
    # A newer plan forgets the document while its upload waits for the partner, and a later one
    # sends it again: on disk, each in the order planned, or a restart restores the wrong one.
    forgotten = asyncio.ensure_future(
        executor.write_after(Tombstone(DocKey("a", "bat-1", "doc-1")))
    )
    again = executor.submit([upload("a", 1, body="v2")], source=SOURCE)
    for _ in range(3):  # turns of the loop, in which a record written at once would land
        await asyncio.sleep(0)
    assert [written(record) for record in changelog.records] == ["uploading v1"]
    partner.gate.set()
    await asyncio.gather(first.future, forgotten, again.future)

    assert [written(record) for record in changelog.records] == [
        "uploading v1",
        "published v1",
        "tombstone",
        "uploading v2",
        "published v2",
    ]
    # Nothing queued on a document: its record is written at once.
    await executor.write_after(Tombstone(DocKey("a", "bat-1", "doc-2")))
    assert written(changelog.records[-1]) == "tombstone"
    assert executor.pending == 0


async def test_live_work_finds_room_while_a_backfill_fills_the_window(
    scheduler: Scheduler,
) -> None:
    partner = Partner()
    partner.gate.clear()
    executor = executor_with(scheduler, partner, window=8)
    backfill = executor.submit([upload("a", n) for n in range(100)], source=SOURCE)
    await eventually(lambda: partner.started == 3)  # backfill leaves a worker to live work

    live = executor.submit([upload("a", 1_000, lane=Lane.LIVE)], source=SOURCE)
    await eventually(lambda: partner.started == 4)  # started while the backfill is stuck

    partner.gate.set()
    await asyncio.gather(backfill.future, live.future)


async def test_a_paused_agency_takes_no_room_and_is_held_not_pending(
    scheduler: Scheduler,
) -> None:
    partner = Partner()
    executor = executor_with(scheduler, partner, window=2)
    scheduler.set_paused(frozenset({"paused"}))
    executor.resume()
    held = executor.submit([upload("paused", n) for n in range(50)], source=SOURCE)
    other = executor.submit([upload("other", 100 + n) for n in range(20)], source=SOURCE)

    await other.future  # the paused agency's 50 operations left room for these
    assert (executor.pending, executor.held) == (0, 50)
    assert not held.future.done()
    assert partner.calls == [(f"doc-{100 + n}", partner.calls[n][1]) for n in range(20)]

    scheduler.set_paused(frozenset())
    executor.resume()
    await held.future
    assert (executor.pending, executor.held) == (0, 0)
    assert len(partner.calls) == 70


async def test_a_throttled_agency_does_not_fill_the_window_of_another() -> None:
    partner = Partner()
    limits = {"slow": RateLimit(rate_per_second=0.5, burst=1)}
    async with Scheduler(concurrency=4, default_rate_limit=UNLIMITED, rate_limits=limits) as sched:
        executor = executor_with(sched, partner, window=8)
        slow = executor.submit([upload("slow", n) for n in range(50)], source=SOURCE)
        fast = executor.submit([upload("fast", 1_000 + n) for n in range(300)], source=SOURCE)

        # Were the window handed out in turns, the throttled agency's chains would take it all
        # (each waits seconds for a token) and the other would send one document per turn.
        async with asyncio.timeout(10):
            await fast.future
        assert not slow.future.done()
        await executor.cancel_all()


async def test_closing_a_partition_cancels_its_batches_and_empties_its_backlog(
    scheduler: Scheduler,
) -> None:
    partner = Partner()
    partner.gate.clear()
    registry = CollectorRegistry()
    executor = OperationExecutor(
        view=PublishedView(),
        writer=Changelog(),
        scheduler=scheduler,
        partner=cast(ChouetteCoproClient, partner),
        content=ContentStage(fetch=Store().fetch, per_agency=8),
        dead_letters=cast(DeadLetterSink, None),
        metrics=RelayMetrics.create(registry, version="test"),
        window=4,
    )
    batch = executor.submit([upload("a", n % 50) for n in range(100)], source=SOURCE)
    await eventually(lambda: partner.started == 3)

    await executor.cancel_all()

    assert batch.future.cancelled()  # its offsets stay open: the next owner reads them again
    backlog = registry.get_sample_value(
        "chouette_relay_backlog_operations", {"lane": "backfill", "operation": "upload"}
    )
    assert (backlog, executor.pending) == (0.0, 0)


async def test_a_backfill_only_pause_holds_the_backfill_and_leaves_room_for_live_work(
    scheduler: Scheduler,
) -> None:
    partner = Partner()
    executor = executor_with(scheduler, partner, window=2)
    scheduler.set_paused(frozenset(), backfill_only=frozenset({"a"}))
    executor.resume()
    backfill = executor.submit([upload("a", n) for n in range(30)], source=SOURCE)
    live = executor.submit([upload("a", 100 + n, lane=Lane.LIVE) for n in range(10)], source=SOURCE)

    await live.future  # the held backfill took no room from the agency's live documents
    assert (executor.pending, executor.held) == (0, 30)
    assert not backfill.future.done()
    assert sorted(call[0] for call in partner.calls) == sorted(f"doc-{100 + n}" for n in range(10))

    scheduler.set_paused(frozenset())
    executor.resume()
    await backfill.future
    assert (executor.pending, executor.held) == (0, 0)
    assert len(partner.calls) == 40
