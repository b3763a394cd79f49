"""State records are written with a bounded number in flight per partition, and a restore skips
what it cannot read instead of stopping there.

A plan of any size waits for room rather than filling the producer until its sends time out; an
unreadable record is reported with its place in the batch, what it named becomes unknown, and a
later readable record of the same key wins.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry

from consumer.core.events import Module
from consumer.core.state import DocKey, DocStatus, DocumentRecord, StateDecodeError
from consumer.core.state_codec import encode_state
from consumer.core.view import PublishedView
from consumer.kafka.brokerwatch import BrokerWatch
from consumer.kafka.changelog import ChangelogWriter
from consumer.metrics import RelayMetrics

KEY = DocKey("agence-a", "bat-1", "doc-1")


class FakeProducer:
    """Acknowledges a record only when the test says so; counts what is in flight."""

    def __init__(self) -> None:
        self.in_flight: list[asyncio.Future[None]] = []
        self.most = 0
        self.sent = 0

    async def send(self, topic: str, **record: Any) -> asyncio.Future[None]:
        delivery: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.in_flight.append(delivery)
        self.sent += 1
        self.most = max(self.most, sum(1 for d in self.in_flight if not d.done()))
        return delivery

    def acknowledge_all(self) -> None:
        for delivery in self.in_flight:
            if not delivery.done():
                delivery.set_result(None)
        self.in_flight.clear()


def _record(document_id: str = "doc-1", status: DocStatus = DocStatus.BASELINE) -> DocumentRecord:
    return DocumentRecord(
        key=DocKey("agence-a", "bat-1", document_id),
        sha256="a" * 64,
        size_bytes=10,
        document_date=dt.date(2025, 1, 1),
        module=Module("ag"),
        seen_at=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
        status=status,
    )


async def test_writes_beyond_the_bound_wait_for_room_instead_of_filling_the_producer() -> None:
    producer = FakeProducer()
    watch = BrokerWatch(
        bootstrap_servers="kafka-0:9092",
        unavailable_timeout_s=30.0,
        window_s=10.0,
        metrics=RelayMetrics.create(CollectorRegistry(), version="test"),
    )
    writer = ChangelogWriter(
        producer=producer,
        topic="state",
        partition=0,
        watch=watch,
        max_queued=50,
        chunk=20,
    )
    writes = [asyncio.create_task(writer.write(_record(f"doc-{n}"))) for n in range(500)]
    while not all(w.done() for w in writes):
        await asyncio.sleep(0)
        assert writer.queued <= 50
        producer.acknowledge_all()
        await asyncio.sleep(0)
    await asyncio.gather(*writes)

    assert producer.sent == 500
    assert producer.most <= 20  # one chunk in the producer at a time


class Read(NamedTuple):
    key: bytes | None
    value: bytes | None


def test_a_restore_skips_an_unreadable_record_and_a_later_readable_one_wins() -> None:
    view = PublishedView()
    key, value = encode_state(_record())
    skipped: list[tuple[int, str]] = []

    def skip(index: int, error: StateDecodeError) -> None:
        skipped.append((index, str(error)))

    applied = view.restore(
        [Read(key, value), Read(key, b"\x00not a record"), Read(b"\xff", b"{}")],
        on_unreadable=skip,
    )

    assert applied == 1
    assert [index for index, _ in skipped] == [1, 2]
    assert view.document(KEY) is None  # the newest record of it was unreadable
    assert view.is_unknown(KEY)

    view.restore([Read(key, value)], on_unreadable=skip)
    assert view.document(KEY) is not None
    assert not view.is_unknown(KEY)


def test_without_a_handler_an_unreadable_record_still_stops_the_restore() -> None:
    view = PublishedView()
    try:
        view.restore([Read(b"agence-a:bat-1:doc-1", b"\x00")])
    except StateDecodeError:
        return
    raise AssertionError("an unreadable record was applied silently")
