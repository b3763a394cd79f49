"""The executor's end of the failure taxonomy: one document's surprise never stops the relay.

An exception no edge foresaw in a document's work parks that document with the reason
``unexpected:<ExceptionType>`` (counted, logged with its traceback); a changelog that cannot be
written is raised, to stop the relay. Partner and content stand-ins, a real scheduler.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import AsyncIterator
from typing import cast

import msgspec
import pytest
from aiokafka.errors import KafkaTimeoutError
from prometheus_client import CollectorRegistry

from consumer.core.events import Content, Document
from consumer.core.planning.plan import Lane, Upload
from consumer.core.records import SourceRecord
from consumer.core.state import DocKey, DocStatus, DocumentRecord, StateRecord
from consumer.core.view import PublishedView
from consumer.kafka.deadletters import DeadLetterSink
from consumer.metrics import RelayMetrics
from consumer.partner.client import ChouetteCoproClient
from consumer.partner.content import ContentStage
from consumer.partner.executor import OperationExecutor
from consumer.partner.scheduler import RetryPolicy, Scheduler
from tests.writers import WritesAtOnce

KEY = DocKey("agence-a", "bat-1", "doc-1")
SOURCE = SourceRecord("docs", 0, 3, 0, b"agence-a:bat-1", b"{}", ())


class Changelog(WritesAtOnce):
    def __init__(self, *, broken: bool = False) -> None:
        self.records: list[StateRecord] = []
        self.broken = broken

    async def write(self, record: StateRecord) -> None:
        if self.broken:
            raise KafkaTimeoutError("state topic unreachable")
        self.records.append(record)


class BrokenContent:
    async def fetch(self, content: Content) -> bytes:
        raise ValueError("a bug while fetching")


class Partner:
    def redact(self, text: str) -> str:
        return text


def upload() -> Upload:
    document = msgspec.convert(
        {
            "id": KEY.document_id,
            "module": "ag",
            "category": "PV",
            "title": "PV AG",
            "document_date": "2025-01-01",
            "audience": "building",
            "content": {
                "media_type": "application/pdf",
                "size_bytes": 10,
                "sha256": "a" * 64,
                "url": "https://lsc.example/d.pdf",
            },
        },
        type=Document,
    )
    return Upload(KEY, document, "c-1", Lane.LIVE, dt.datetime(2025, 1, 1, tzinfo=dt.UTC))


@pytest.fixture
async def scheduler() -> AsyncIterator[Scheduler]:
    async with Scheduler(concurrency=2) as running:
        yield running


def executor_with(
    scheduler: Scheduler, writer: Changelog, metrics: RelayMetrics
) -> OperationExecutor:
    return OperationExecutor(
        view=PublishedView(),
        writer=writer,
        scheduler=scheduler,
        partner=cast(ChouetteCoproClient, Partner()),
        content=ContentStage(fetch=BrokenContent().fetch, per_agency=8),
        dead_letters=cast(DeadLetterSink, None),
        metrics=metrics,
        document_retry=RetryPolicy(max_attempts=2, base_seconds=0.01, cap_seconds=0.01),
    )


async def test_an_unforeseen_error_parks_the_document_and_the_work_ends(
    scheduler: Scheduler, caplog: pytest.LogCaptureFixture
) -> None:
    writer = Changelog()
    registry = CollectorRegistry()
    executor = executor_with(scheduler, writer, RelayMetrics.create(registry, version="test"))

    await executor.submit([upload()], source=SOURCE).future  # ends: no exception for the processor

    parked = [r for r in writer.records if isinstance(r, DocumentRecord)]
    assert [r.status for r in parked] == [DocStatus.PARKED]
    assert parked[0].parked_reason == "unexpected:ValueError: a bug while fetching"
    assert parked[0].document is not None  # kept whole, to be sent again after the fix
    counted = registry.get_sample_value(
        "chouette_relay_unexpected_errors_total", {"scope": "document"}
    )
    assert counted == 1.0
    [logged] = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert "unexpected" in logged.getMessage()


async def test_a_changelog_that_cannot_be_written_is_raised(scheduler: Scheduler) -> None:
    metrics = RelayMetrics.create(CollectorRegistry(), version="test")
    executor = executor_with(scheduler, Changelog(broken=True), metrics)

    with pytest.raises(KafkaTimeoutError):
        await executor.submit([upload()], source=SOURCE).future
