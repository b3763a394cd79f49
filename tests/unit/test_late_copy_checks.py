"""Late-copy checks: a document sent again after an in-doubt create is looked up again later.

The partner may carry out a create the relay gave up on later than the relay waited; the lookup
before sending again found nothing, so the document now has two copies. The checks it still owes
are kept in its state record (the JSON form, read by older records' rules too), the restored view
yields them, and the executor withdraws every copy but the one the view records.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from collections.abc import AsyncIterator
from typing import Any, cast

import msgspec
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from consumer.core.events import Content, Document, Module
from consumer.core.planning.plan import Lane, Upload
from consumer.core.records import SourceRecord
from consumer.core.state import (
    DocKey,
    DocStatus,
    DocumentRecord,
    LateCopyChecks,
    StateDecodeError,
    StateRecord,
)
from consumer.core.state_codec import decode_state, encode_state
from consumer.core.state_compact import COMPACT_FORM
from consumer.core.view import PublishedView
from consumer.kafka.deadletters import DeadLetterSink
from consumer.metrics import RelayMetrics
from consumer.partner import executor as executor_module
from consumer.partner.answers import RemoteDocument
from consumer.partner.client import ChouetteCoproClient
from consumer.partner.content import ContentStage
from consumer.partner.executor import OperationExecutor
from consumer.partner.scheduler import Scheduler
from consumer.settings import PartnerSettings
from tests.changelog_forms import first_form
from tests.unit.test_state import VALIDATOR, validate
from tests.writers import WritesAtOnce

KEY = DocKey("agence-a", "bat-1", "doc-1")
SENT_AGAIN = dt.datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=dt.UTC)
SCHEDULE = (60.0, 120.0, 240.0, 600.0)


def published(**changes: Any) -> DocumentRecord:
    fields: dict[str, Any] = {
        "key": KEY,
        "status": DocStatus.PUBLISHED,
        "sha256": hashlib.sha256(b"v1").hexdigest(),
        "module": Module.AG,
        "seen_at": dt.datetime(2026, 3, 4, tzinfo=dt.UTC),
        "document_date": dt.date(2026, 3, 1),
        "size_bytes": 52_000,
        "remote_id": "doc-2",
        "condominium_id": "c-1",
    }
    return DocumentRecord(**(fields | changes))


# -- the schedule ----------------------------------------------------------------------------------


def test_the_checks_owed_fall_due_at_each_time_of_the_schedule_after_the_document_was_sent() -> (
    None
):
    checks: LateCopyChecks | None = LateCopyChecks(SENT_AGAIN, len(SCHEDULE))
    due = []
    while checks is not None:
        due.append(checks.due_at(SCHEDULE))
        checks = checks.after_one()
    assert due == [SENT_AGAIN + dt.timedelta(seconds=s) for s in SCHEDULE]


@given(
    schedule=st.lists(st.integers(1, 86_400), min_size=1, max_size=16, unique=True).map(sorted),
    left=st.integers(1, 40),
)
def test_a_schedule_changed_since_the_record_was_written_still_ends(
    schedule: list[int], left: int
) -> None:
    times = tuple(float(s) for s in schedule)
    checks: LateCopyChecks | None = LateCopyChecks(SENT_AGAIN, left)
    due: list[dt.datetime] = []
    while checks is not None:
        at = checks.due_at(times)
        assert at is not None
        due.append(at)
        checks = checks.after_one()
    assert len(due) == left  # exactly what the record owes, never more
    assert due == sorted(due)  # never earlier than the one before
    assert due[-1] == SENT_AGAIN + dt.timedelta(seconds=times[-1])  # the last one is the last


def test_nothing_is_due_under_an_empty_schedule() -> None:
    assert LateCopyChecks(SENT_AGAIN, 3).due_at(()) is None


def test_the_schedule_setting_increases_and_stays_within_a_day() -> None:
    assert PartnerSettings().late_copy_checks_s == SCHEDULE
    assert PartnerSettings(late_copy_checks_s=()).late_copy_checks_s == ()
    for wrong in ((60.0, 60.0), (120.0, 60.0), (0.0, 60.0), (60.0, 90_000.0)):
        with pytest.raises(ValidationError):
            PartnerSettings(late_copy_checks_s=wrong)


# -- the state record ------------------------------------------------------------------------------


def test_a_record_owing_checks_round_trips_in_the_json_form_and_matches_the_schema() -> None:
    record = published(late_copy_checks=LateCopyChecks(SENT_AGAIN, 3))
    key, value = encode_state(record)
    assert value is not None
    assert value.startswith(b"{")
    validate(value)
    assert orjson.loads(value)["late_copy_checks"] == {
        "since": "2026-03-04T05:06:07.890123Z",
        "left": 3,
    }
    assert decode_state(key, value) == record


def test_a_record_owing_nothing_is_written_as_before() -> None:
    record = published()
    value = encode_state(record)[1] or b""
    assert value[0] == COMPACT_FORM
    assert decode_state(KEY.encode(), value) == record
    parked = published(status=DocStatus.PARKED, parked_reason="unmapped_building")
    json_value = encode_state(parked)[1] or b""
    assert "late_copy_checks" not in orjson.loads(json_value)  # no cost where there is none


@pytest.mark.parametrize("status", [DocStatus.PUBLISHED, DocStatus.UPLOADING])
def test_records_written_before_the_checks_existed_are_read_owing_none(status: DocStatus) -> None:
    record = published(status=status)
    VALIDATOR.validate(orjson.loads(first_form(record)))
    restored = decode_state(KEY.encode(), first_form(record))
    assert isinstance(restored, DocumentRecord)
    assert restored.late_copy_checks is None
    assert restored == record


@pytest.mark.parametrize(
    "checks",
    [{"since": "2026-03-04T05:06:07Z", "left": 0}, {"since": "yesterday", "left": 1}, [1]],
)
def test_checks_the_relay_cannot_trust_make_the_record_unreadable(checks: object) -> None:
    value = orjson.loads(first_form(published()))
    value["late_copy_checks"] = checks
    with pytest.raises(StateDecodeError):
        decode_state(KEY.encode(), orjson.dumps(value))


# -- the view --------------------------------------------------------------------------------------


def test_the_restored_view_yields_the_documents_owing_checks_until_a_record_owes_none() -> None:
    owing = published(late_copy_checks=LateCopyChecks(SENT_AGAIN, 2))
    other = published(key=DocKey("agence-a", "bat-1", "doc-2"))
    view = PublishedView()
    view.restore([_Encoded(*encode_state(r)) for r in (other, owing)])

    assert list(view.late_copy_checks()) == [owing]
    assert view.document(KEY) == owing

    view.restore([_Encoded(*encode_state(published(remote_id="doc-3")))])  # compact, owes none
    assert list(view.late_copy_checks()) == []

    view.apply(owing)
    view.apply_encoded(KEY.encode(), None)  # withdrawn
    assert list(view.late_copy_checks()) == []


class _Encoded:
    def __init__(self, key: bytes, value: bytes | None) -> None:
        self.key, self.value = key, value


# -- the executor ----------------------------------------------------------------------------------


class Changelog(WritesAtOnce):
    def __init__(self) -> None:
        self.records: list[StateRecord] = []

    async def write(self, record: StateRecord) -> None:
        self.records.append(record)


class Partner:
    """The partner's copies of one reference; the late copy appears after ``late_after`` lookups."""

    def __init__(self, *, late_after: int) -> None:
        self.copies = [RemoteDocument("doc-2", KEY.document_id, published().sha256)]
        self.late_after = late_after
        self.lookups = 0
        self.withdrawn: list[str] = []
        self.calls: list[str] = []

    async def find_all_by_reference(
        self, *, agency_id: str, condominium_id: str, reference: str
    ) -> list[RemoteDocument]:
        assert (agency_id, condominium_id, reference) == ("agence-a", "c-1", KEY.document_id)
        self.lookups += 1
        self.calls.append("lookup")
        if self.lookups == self.late_after:
            self.copies.insert(0, RemoteDocument("doc-1", KEY.document_id, published().sha256))
        return list(self.copies)

    async def delete(self, *, agency_id: str, remote_id: str) -> None:
        self.withdrawn.append(remote_id)
        self.calls.append(f"delete {remote_id}")
        self.copies = [c for c in self.copies if c.remote_id != remote_id]

    async def update(
        self, *, agency_id: str, remote_id: str, document: Document, content: bytes
    ) -> RemoteDocument:
        self.calls.append(f"update {remote_id}")
        return RemoteDocument(remote_id, document.id, document.content.sha256)

    def redact(self, text: str) -> str:
        return text


@pytest.fixture
async def scheduler() -> AsyncIterator[Scheduler]:
    async with Scheduler(concurrency=2) as running:
        yield running


async def no_content(_: object) -> bytes:
    raise AssertionError("a check fetches no content")


async def test_a_restored_view_owing_checks_makes_them_and_withdraws_the_late_copy(
    scheduler: Scheduler,
) -> None:
    view = PublishedView()
    view.apply(published(late_copy_checks=LateCopyChecks(SENT_AGAIN, 2)))
    partner, writer, registry = Partner(late_after=1), Changelog(), CollectorRegistry()
    executor = OperationExecutor(
        view=view,
        writer=writer,
        scheduler=scheduler,
        partner=cast(ChouetteCoproClient, partner),
        content=ContentStage(fetch=no_content, per_agency=1),
        dead_letters=cast(DeadLetterSink, None),
        metrics=RelayMetrics.create(registry, version="test"),
        late_copy_checks=(1.0, 2.0),
        clock=lambda: SENT_AGAIN + dt.timedelta(hours=1),  # both due: the relay was down
    )

    assert executor.schedule_late_copy_checks() == 1
    assert executor.late_copy_checks_owed == 1
    deadline = asyncio.get_running_loop().time() + 10
    while executor.late_copy_checks_owed or executor.pending:
        assert asyncio.get_running_loop().time() < deadline, "the checks were not made"
        await asyncio.sleep(0.01)

    assert partner.withdrawn == ["doc-1"]  # the late copy; the view's copy stays
    assert [c.remote_id for c in partner.copies] == ["doc-2"]
    assert partner.lookups == 2
    owed = [r.late_copy_checks for r in writer.records if isinstance(r, DocumentRecord)]
    assert owed == [LateCopyChecks(SENT_AGAIN, 1), None]
    assert view.document(KEY) == published()
    assert list(view.late_copy_checks()) == []

    def counted(outcome: str) -> float | None:
        return registry.get_sample_value(
            "chouette_relay_late_copy_checks_total", {"outcome": outcome}
        )

    assert (counted("found"), counted("clean"), counted("failed")) == (1.0, 1.0, 0.0)
    duplicate = registry.get_sample_value(
        "chouette_relay_operations_total",
        {"lane": "live", "operation": "delete", "outcome": "duplicate"},
    )
    assert duplicate == 1.0


def test_a_document_whose_create_is_in_doubt_is_unknown_until_a_record_of_it_is_applied() -> None:
    view = PublishedView()
    view.doubt(KEY)
    assert view.is_unknown(KEY)  # its next upload looks it up first
    view.apply(published(status=DocStatus.UPLOADING, remote_id=None))
    assert not view.is_unknown(KEY)


async def test_a_check_due_while_its_document_has_work_waits_for_it_and_survives_its_record(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(executor_module, "CHECK_BUSY_DELAY_S", 0.01)
    view = PublishedView()
    view.apply(published(late_copy_checks=LateCopyChecks(SENT_AGAIN, 1)))
    released = asyncio.Event()

    async def fetch(_: Content) -> bytes:
        await released.wait()  # the new version's upload stays in the window meanwhile
        return b"v2"

    partner, writer = Partner(late_after=1), Changelog()
    executor = OperationExecutor(
        view=view,
        writer=writer,
        scheduler=scheduler,
        partner=cast(ChouetteCoproClient, partner),
        content=ContentStage(fetch=fetch, per_agency=1),
        dead_letters=cast(DeadLetterSink, None),
        metrics=RelayMetrics.create(CollectorRegistry(), version="test"),
        late_copy_checks=(60.0,),
        clock=lambda: SENT_AGAIN + dt.timedelta(hours=1),  # due at once
    )
    assert executor.schedule_late_copy_checks() == 1  # due at the loop's next turn
    new_version = _upload(b"v2", remote_id="doc-2")
    batch = executor.submit([new_version], source=SourceRecord("docs", 0, 7, 0, None, None, ()))
    for _ in range(20):
        await asyncio.sleep(0)  # the check's timer fires, and finds the upload queued
    released.set()
    await batch.future
    deadline = asyncio.get_running_loop().time() + 10
    while executor.late_copy_checks_owed or executor.pending:
        assert asyncio.get_running_loop().time() < deadline, "the check was not made"
        await asyncio.sleep(0.01)

    assert partner.calls == ["update doc-2", "lookup", "delete doc-1"]
    sha = hashlib.sha256(b"v2").hexdigest()
    documents = [r for r in writer.records if isinstance(r, DocumentRecord)]
    # The upload's outcome still owes the check (a crash then would not lose it); the check's
    # own record owes nothing more, and the view holds the new version.
    assert [(r.status, r.sha256, r.late_copy_checks) for r in documents][-2:] == [
        (DocStatus.PUBLISHED, sha, LateCopyChecks(SENT_AGAIN, 1)),
        (DocStatus.PUBLISHED, sha, None),
    ]
    current = view.document(KEY)
    assert current is not None
    assert (current.status, current.remote_id, current.sha256) == (
        DocStatus.PUBLISHED,
        "doc-2",
        sha,
    )
    assert current.late_copy_checks is None


def _upload(data: bytes, *, remote_id: str) -> Upload:
    document = msgspec.convert(
        {
            "id": KEY.document_id,
            "module": "ag",
            "category": "PV",
            "title": "PV AG",
            "document_date": "2026-03-01",
            "audience": "building",
            "content": {
                "media_type": "application/pdf",
                "size_bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "url": "https://lsc.example/d.pdf",
            },
        },
        type=Document,
    )
    return Upload(
        KEY,
        document,
        "c-1",
        Lane.LIVE,
        dt.datetime(2026, 3, 4, tzinfo=dt.UTC),
        remote_id=remote_id,
        previous=published(),
    )
