"""Content is a stage of its own: fetched per agency before a partner slot is taken.

An agency whose store is slow holds back only its own documents, the bytes held at once are
bounded per agency, a document waiting for a partner slot included, and a live document does not
queue for its content behind its agency's first publication. A real scheduler and
executor; document store and partner stand-ins whose answers the test releases.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
from collections.abc import Callable
from typing import cast

import msgspec
from prometheus_client import CollectorRegistry

from consumer.core.events import Content, Document
from consumer.core.planning.plan import Lane, Upload
from consumer.core.records import SourceRecord
from consumer.core.state import DocKey, StateRecord
from consumer.core.view import PublishedView
from consumer.kafka.deadletters import DeadLetterSink
from consumer.metrics import RelayMetrics
from consumer.partner.answers import RemoteDocument
from consumer.partner.client import ChouetteCoproClient
from consumer.partner.content import ContentStage
from consumer.partner.executor import OperationExecutor
from consumer.partner.scheduler import RateLimit, Scheduler
from tests.writers import WritesAtOnce

SOURCE = SourceRecord("documents", 0, 7, 0, b"a:b", b"{}", ())
UNLIMITED = RateLimit(rate_per_second=1e9, burst=1_000_000)
SLOW_HOST = "slow.lsc.example"


class Changelog(WritesAtOnce):
    async def write(self, record: StateRecord) -> None:
        return None


class Store:
    """Serves at once, but documents on the slow host only once the test opens ``slow``.

    ``most_in_hand`` is, per agency, the most documents fetched and not yet through the
    partner, seen at any fetch: what the relay held in memory at once.
    """

    def __init__(self, partner: Partner) -> None:
        self.slow = asyncio.Event()
        self.fetched: list[str] = []
        self.most_in_hand: dict[str, int] = {}
        self._partner = partner

    async def fetch(self, content: Content) -> bytes:
        url = content.url or ""
        self.fetched.append(url)
        agency = url.split("/")[3]
        fetched = sum(f"/{agency}/" in u for u in self.fetched)
        sent = sum(call.startswith(f"{agency}-") for call in self._partner.calls)
        self.most_in_hand[agency] = max(self.most_in_hand.get(agency, 0), fetched - sent)
        if SLOW_HOST in url:
            await self.slow.wait()
        return b"%PDF"


class Partner:
    """Answers each upload once the test opens the gate; remembers the documents sent."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.calls: list[str] = []

    def redact(self, text: str) -> str:
        return text

    async def upload(
        self, *, agency_id: str, condominium_id: str, document: Document, content: bytes
    ) -> RemoteDocument:
        await self.gate.wait()
        self.calls.append(document.id)
        return RemoteDocument(f"r-{document.id}", document.id, document.content.sha256)


def upload(
    agency: str, number: int, *, host: str = "lsc.example", lane: Lane = Lane.LIVE
) -> Upload:
    document = msgspec.convert(
        {
            "id": f"{agency}-doc-{number}",
            "module": "ag",
            "category": "PV",
            "title": "PV AG",
            "document_date": "2025-01-01",
            "audience": "building",
            "content": {
                "media_type": "application/pdf",
                "size_bytes": 4,
                "sha256": hashlib.sha256(b"%PDF").hexdigest(),
                "url": f"https://{host}/{agency}/{number}.pdf",
            },
        },
        type=Document,
    )
    key = DocKey(agency, "bat-1", document.id)
    return Upload(key, document, "c-1", lane, dt.datetime(2025, 1, 1, tzinfo=dt.UTC))


def executor_with(
    scheduler: Scheduler, partner: Partner, store: Store, *, per_agency: int
) -> OperationExecutor:
    return OperationExecutor(
        view=PublishedView(),
        writer=Changelog(),
        scheduler=scheduler,
        partner=cast(ChouetteCoproClient, partner),
        content=ContentStage(fetch=store.fetch, per_agency=per_agency),
        dead_letters=cast(DeadLetterSink, None),
        metrics=RelayMetrics.create(CollectorRegistry(), version="test"),
    )


async def eventually(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` until it holds, failing the test after a generous deadline."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_an_agencys_slow_store_holds_no_partner_slot_from_another_agency() -> None:
    partner = Partner()
    store = Store(partner)
    async with Scheduler(concurrency=2, default_rate_limit=UNLIMITED) as scheduler:
        executor = executor_with(scheduler, partner, store, per_agency=8)
        slow = executor.submit(
            [upload("agence-a", n, host=SLOW_HOST) for n in range(8)], source=SOURCE
        )
        await eventually(lambda: len(store.fetched) == 8)  # every slot of the scheduler's taken

        other = executor.submit([upload("agence-b", 1)], source=SOURCE)
        await eventually(lambda: partner.calls == ["agence-b-doc-1"])

        assert not slow.future.done()  # agency A still waits on its own store
        store.slow.set()
        await asyncio.wait_for(asyncio.gather(slow.future, other.future), timeout=10)
    assert sorted(partner.calls) == sorted(
        ["agence-b-doc-1"] + [f"agence-a-doc-{n}" for n in range(8)]
    )


async def test_an_agency_holds_at_most_its_slots_of_content_waiting_for_the_partner() -> None:
    partner = Partner()
    partner.gate.clear()
    store = Store(partner)
    async with Scheduler(concurrency=4, default_rate_limit=UNLIMITED) as scheduler:
        executor = executor_with(scheduler, partner, store, per_agency=2)
        batch = executor.submit([upload("agence-a", n) for n in range(6)], source=SOURCE)
        other = executor.submit([upload("agence-b", n) for n in range(2)], source=SOURCE)
        await eventually(lambda: len(store.fetched) == 4)  # two of each agency's, in hand

        partner.gate.set()
        await asyncio.wait_for(asyncio.gather(batch.future, other.future), timeout=10)

    assert len(partner.calls) == 8
    assert store.most_in_hand == {"agence-a": 2, "agence-b": 2}


async def test_a_live_document_is_fetched_beside_its_agencys_first_publication() -> None:
    partner = Partner()
    partner.gate.clear()
    store = Store(partner)
    async with Scheduler(concurrency=1, default_rate_limit=UNLIMITED) as scheduler:
        executor = executor_with(scheduler, partner, store, per_agency=4)
        history = [upload("agence-a", n, lane=Lane.BACKFILL) for n in range(10)]
        backfill = executor.submit(history, source=SOURCE)
        await eventually(lambda: len(store.fetched) == 3)  # all but a quarter of the slots

        live = executor.submit([upload("agence-a", 99)], source=SOURCE)
        await eventually(lambda: len(store.fetched) == 4)
        partner.gate.set()
        await asyncio.wait_for(asyncio.gather(backfill.future, live.future), timeout=10)

    # Sent right after the backfill document already with the partner, ahead of the others.
    assert partner.calls.index("agence-a-doc-99") == 1
