"""A command record is checked by the replica that carries it out, whoever wrote it.

The commands topic is a trust boundary: a record there may come from an older CLI, a replay or a
forged producer. The owning replica refuses an agency its routing file does not know, and a
building it does not map, with one log line and a count: no state record, no metric series of
the target, and the record's offset released. With a command key, a record not signed with it
is refused the same way.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from consumer.app.processor import COMMANDS, DOCUMENTS, MANIFESTS, PartitionProcessor
from consumer.core.commands import (
    MAC_HEADER,
    AgencyAction,
    HeldAction,
    OperatorCommand,
    Refusal,
    command_mac,
    mac_refusal,
)
from consumer.core.controls import refusal
from consumer.core.guard import DeletionGuard
from consumer.core.manifest import ManifestAssembler
from consumer.core.records import SourceRecord
from consumer.core.routing import RoutingTable
from consumer.core.state import AgencyRecord, StateRecord
from consumer.core.view import PublishedView
from consumer.kafka.deadletters import DeadLetterSink
from consumer.metrics import RelayMetrics
from consumer.ops.admin import Operator, UnknownTargetError
from consumer.partner.executor import OperationExecutor
from consumer.settings import KafkaSettings, Settings
from tests.writers import WritesAtOnce

NOW = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
TOPICS = {DOCUMENTS: "docs", MANIFESTS: "manifests", COMMANDS: "commands"}
ROUTING = RoutingTable.from_mapping(
    {
        "agencies": {
            "agence-nantes": {
                "modules": ["ag"],
                "first_publication": "history",
                "condominia": {"bat-1": "c-1"},
            },
            "agence-nancy": {"modules": ["ag"], "first_publication": "fresh"},
        }
    }
)


def command(action: AgencyAction | HeldAction, agency: str, building: str | None = None) -> Any:
    return OperatorCommand(
        command=action,
        agency_id=agency,
        building_id=building,
        plan="ab" * 8 if action is AgencyAction.APPROVE else None,
        requested_at=NOW,
        requested_by="cli:someone@somewhere",
    )


@pytest.mark.parametrize(
    ("action", "agency", "building", "expected"),
    [
        (AgencyAction.PAUSE, "agence-nowhere", None, Refusal.UNKNOWN_AGENCY),
        (AgencyAction.APPROVE, "agence-nowhere", None, Refusal.UNKNOWN_AGENCY),
        (HeldAction.RELEASE, "agence-nowhere", "bat-1", Refusal.UNKNOWN_AGENCY),
        (AgencyAction.RETRY, "agence-nantes", "bat-99", Refusal.UNKNOWN_BUILDING),
        (HeldAction.DISCARD, "agence-nantes", "bat-99", Refusal.UNKNOWN_BUILDING),
        (AgencyAction.PAUSE, "agence-nantes", None, None),
        (AgencyAction.RETRY, "agence-nantes", "bat-1", None),
    ],
)
def test_the_replica_refuses_what_its_routing_file_does_not_know(
    action: AgencyAction | HeldAction, agency: str, building: str | None, expected: Refusal | None
) -> None:
    assert refusal(ROUTING, command(action, agency, building)) is expected


class RecordingChangelog(WritesAtOnce):
    def __init__(self) -> None:
        self.written: list[StateRecord] = []

    async def write(self, record: StateRecord) -> None:
        await asyncio.sleep(0)
        self.written.append(record)


class NothingQueued:
    """An executor without partner work: a record is written at once."""

    def __init__(self, writer: RecordingChangelog) -> None:
        self._writer = writer

    def write_after(self, record: StateRecord) -> Any:
        return self._writer.write(record)

    def queue_after(self, record: StateRecord) -> None:
        return None  # nothing is ever queued: the processor writes the record at once


def processor(writer: RecordingChangelog, metrics: RelayMetrics) -> PartitionProcessor:
    return PartitionProcessor(
        partition=0,
        topics=TOPICS,
        view=PublishedView(),
        assembler=ManifestAssembler(expiry=dt.timedelta(hours=1), max_pending_items=1000),
        routing=ROUTING,
        guard=DeletionGuard(max_share=0.5, min_count=3),
        executor=cast(OperationExecutor, NothingQueued(writer)),  # only writes are used
        writer=writer,
        dead_letters=cast(DeadLetterSink, None),  # nothing here is dead-lettered
        metrics=metrics,
        max_value_bytes=1 << 20,
        clock=lambda: NOW,
        on_failure=lambda error: None,
    )


def on_topic(offset: int, sent: OperatorCommand) -> SourceRecord:
    return SourceRecord(
        topic="commands",
        partition=0,
        offset=offset,
        timestamp_ms=0,
        key=sent.key,
        value=orjson.dumps(sent.model_dump(mode="json", exclude_none=True)),
        headers=(),
    )


def counted(metrics: RelayMetrics) -> dict[tuple[str, str], float]:
    return {
        (sample.labels["kind"], sample.labels["outcome"]): sample.value
        for family in metrics.commands.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and sample.value
    }


async def test_a_command_for_an_unknown_agency_leaves_no_record_and_is_counted_and_shown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer, metrics = RecordingChangelog(), RelayMetrics.create(CollectorRegistry(), version="t")
    work = processor(writer, metrics)
    forged = [
        command(AgencyAction.PAUSE, "agence-nowhere"),
        command(AgencyAction.APPROVE, "agence-nowhere"),
        command(AgencyAction.RETRY, "agence-nantes", "bat-99"),
        command(HeldAction.RELEASE, "agence-nantes", "bat-99"),
    ]

    await work.handle_batch([on_topic(offset, sent) for offset, sent in enumerate(forged)])

    assert writer.written == []
    assert work.view.agency("agence-nowhere") is None
    assert work.committable() == {"commands": 4}  # refused is done: the offsets move on
    assert counted(metrics) == {
        ("pause", "unknown_agency"): 1,
        ("approve", "unknown_agency"): 1,
        ("retry", "unknown_building"): 1,
        ("release", "unknown_building"): 1,
    }
    assert [(r.command.command, r.refusal) for r in work.refused] == [
        (AgencyAction.PAUSE, Refusal.UNKNOWN_AGENCY),
        (AgencyAction.APPROVE, Refusal.UNKNOWN_AGENCY),
        (AgencyAction.RETRY, Refusal.UNKNOWN_BUILDING),
        (HeldAction.RELEASE, Refusal.UNKNOWN_BUILDING),
    ]
    logged = [r for r in caplog.records if r.message == "operator command refused"]
    assert [(r.agency, r.reason) for r in logged] == [  # type: ignore[attr-defined]
        ("agence-nowhere", "unknown_agency"),
        ("agence-nowhere", "unknown_agency"),
        ("agence-nantes", "unknown_building"),
        ("agence-nantes", "unknown_building"),
    ]


async def test_a_command_for_a_known_agency_is_carried_out_and_counted() -> None:
    writer, metrics = RecordingChangelog(), RelayMetrics.create(CollectorRegistry(), version="t")
    work = processor(writer, metrics)

    await work.handle(on_topic(0, command(AgencyAction.PAUSE, "agence-nantes")))

    async def written() -> None:
        while not writer.written:  # noqa: ASYNC110 - the record is written in a task
            await asyncio.sleep(0)

    await asyncio.wait_for(written(), timeout=5)
    [record] = writer.written
    assert isinstance(record, AgencyRecord)
    assert (record.agency_id, record.paused) == ("agence-nantes", True)
    assert counted(metrics) == {("pause", "carried_out"): 1}
    assert not work.refused


def operator() -> Operator:
    settings = Settings(kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9"))
    return Operator(settings, routing=ROUTING)


def test_an_unknown_agency_is_named_with_the_closest_known_ones() -> None:
    with pytest.raises(UnknownTargetError) as refused:
        operator().check_target("agence-nante")

    assert str(refused.value) == (
        "agency agence-nante is not in the routing file; did you mean agence-nantes or "
        "agence-nancy?"
    )
    assert refused.value.closest == ["agence-nantes", "agence-nancy"]


def test_an_unmapped_building_and_a_name_close_to_nothing_are_refused_too() -> None:
    with pytest.raises(UnknownTargetError, match=r"building bat-99 of agency agence-nantes"):
        operator().check_target("agence-nantes", "bat-99")
    with pytest.raises(UnknownTargetError, match="no known name is close to it"):
        operator().check_target("zzz")
    operator().check_target("agence-nantes", "bat-1")  # known: no error


SECRET = b"operators-command-key"


def test_with_a_command_key_only_records_signed_with_it_are_trusted() -> None:
    key, value = b"agence-nantes", b'{"command":"pause"}'
    signed = [(MAC_HEADER, command_mac(SECRET, key, value))]

    assert mac_refusal(SECRET, key, value, signed) is None
    assert mac_refusal(SECRET, key, value, []) is Refusal.UNSIGNED
    forged = [(MAC_HEADER, command_mac(b"another-key", key, value))]
    assert mac_refusal(SECRET, key, value, forged) is Refusal.BAD_SIGNATURE
    assert mac_refusal(SECRET, b"agence-nancy", value, signed) is Refusal.BAD_SIGNATURE
    assert mac_refusal(SECRET, key, value + b" ", signed) is Refusal.BAD_SIGNATURE
    assert mac_refusal(SECRET, key, value, signed + forged) is Refusal.BAD_SIGNATURE
    # the same bytes split otherwise between key and value are another record
    moved = command_mac(SECRET, key + value[:1], value[1:])
    assert moved != signed[0][1]
    assert mac_refusal(None, key, value, []) is None  # no key: commands are not signed


def test_a_command_key_that_cannot_be_read_is_refused_at_start_up(tmp_path: Path) -> None:
    empty = tmp_path / "empty-key"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValidationError, match="is empty"):
        KafkaSettings(commands_key_file=empty)
    with pytest.raises(ValidationError, match="does not exist"):
        KafkaSettings(commands_key_file=tmp_path / "missing")
    key = tmp_path / "key"
    key.write_text("s3cret\n", encoding="utf-8")
    secret = KafkaSettings(commands_key_file=key).commands_key()
    assert secret is not None
    assert secret.get_secret_value() == "s3cret"
