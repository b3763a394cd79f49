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

from aiokafka.errors import MessageSizeTooLargeError
from prometheus_client import CollectorRegistry

from consumer.core.events import Module
from consumer.core.state import DocKey, DocStatus, DocumentRecord, StateDecodeError
from consumer.core.state_codec import encode_state
from consumer.core.view import PublishedView
from consumer.kafka.brokerwatch import BrokerWatch
from consumer.kafka.changelog import ChangelogWriter
from consumer.metrics import RelayMetrics

KEY = DocKey("agence-a", "bat-1", "doc-1")


class FakeBatch:
    """A record batch that holds at most ``room`` records, as the producer's batch size does."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.keys: list[bytes] = []

    def append(self, *, key: bytes, value: bytes | None, timestamp: None) -> object | None:
        if len(self.keys) >= self.room:
            return None
        self.keys.append(key)
        return object()


class FakeProducer:
    """Acknowledges a record only when the test says so; counts what is in flight. A batch with a
    key in ``refused`` fails as the broker fails a batch with one record too large; that record
    sent alone fails alone."""

    def __init__(self, *, batch_room: int = 7, refused: frozenset[bytes] = frozenset()) -> None:
        self.in_flight: list[tuple[asyncio.Future[None], int]] = []
        self.most = 0
        self.sent = 0
        self.batch_room = batch_room
        self.refused = refused
        self.acknowledged: list[bytes] = []

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self.batch_room)

    async def send_batch(
        self, batch: FakeBatch, topic: str, *, partition: int
    ) -> asyncio.Future[None]:
        return self._carry(batch.keys)

    async def send(self, topic: str, **record: Any) -> asyncio.Future[None]:
        return self._carry([record["key"]])

    def _carry(self, keys: list[bytes]) -> asyncio.Future[None]:
        delivery: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if any(key in self.refused for key in keys):
            delivery.set_exception(MessageSizeTooLargeError())
        else:
            self.in_flight.append((delivery, len(keys)))
            self.acknowledged.extend(keys)
        self.sent += len(keys)
        self.most = max(self.most, sum(n for d, n in self.in_flight if not d.done()))
        return delivery

    def acknowledge_all(self) -> None:
        for delivery, _ in self.in_flight:
            if not delivery.done():
                delivery.set_result(None)
        self.in_flight.clear()


def _watch() -> BrokerWatch:
    return BrokerWatch(
        bootstrap_servers="kafka-0:9092",
        unavailable_timeout_s=30.0,
        window_s=10.0,
        metrics=RelayMetrics.create(CollectorRegistry(), version="test"),
    )


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
    writer = ChangelogWriter(
        producer=producer,
        topic="state",
        partition=0,
        watch=_watch(),
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


async def test_a_record_the_broker_refuses_fails_alone_the_rest_of_its_batch_is_written() -> None:
    records = [_record(f"doc-{n}") for n in range(10)]
    too_large = encode_state(records[3])[0]
    producer = FakeProducer(batch_room=4, refused=frozenset({too_large}))
    writer = ChangelogWriter(
        producer=producer,
        topic="state",
        partition=0,
        watch=_watch(),
        chunk=10,
    )
    futures = [writer.submit(record) for record in records]
    while not all(f.done() for f in futures):
        producer.acknowledge_all()
        await asyncio.sleep(0)

    failed = [n for n, f in enumerate(futures) if f.exception() is not None]
    assert failed == [3]
    assert isinstance(futures[3].exception(), MessageSizeTooLargeError)
    # The records after the refused one were sent again one by one, in order: the last write of
    # each key is its newest record.
    written = [encode_state(r)[0] for n, r in enumerate(records) if n != 3]
    assert producer.acknowledged[-len(written[3:]) :] == written[3:]
    assert set(producer.acknowledged) == set(written)


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
