"""The owning replica answers every command it decides with an outcome record.

The answer names the command by partition and offset, says in words what happened (or why it was
refused), and the command's offset is released only once the answer is acknowledged, so a crash
before it decides the command again. Outcome records themselves are never carried out.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import cast

import orjson
import yaml
from prometheus_client import CollectorRegistry

from consumer.app.processor import COMMANDS, DOCUMENTS, MANIFESTS, PartitionProcessor
from consumer.core.commands import AgencyAction, HeldAction, OperatorCommand, Refusal
from consumer.core.events import Module
from consumer.core.guard import DeletionGuard
from consumer.core.manifest import ManifestAssembler
from consumer.core.outcomes import (
    OUTCOME_MARK,
    RECORD_HEADER,
    CommandOutcome,
    carried_out_outcome,
    decode_outcome,
    describe,
    encode_outcome,
    grouped,
    partition_ranges,
    refusal_outcome,
)
from consumer.core.records import SourceRecord
from consumer.core.state import DocKey, DocStatus, DocumentRecord
from consumer.core.view import PublishedView
from consumer.kafka.changelog import COMMANDS_RETENTION_MS, COMMANDS_TOPIC_CONFIG
from consumer.kafka.deadletters import DeadLetterSink
from consumer.metrics import RelayMetrics
from consumer.ops.cli_operator import render_readable
from consumer.partner.executor import OperationExecutor
from tests.unit.test_command_refusals import (
    ROUTING,
    NothingQueued,
    RecordingChangelog,
    command,
    on_topic,
)

NOW = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
TOPICS = {DOCUMENTS: "docs", MANIFESTS: "manifests", COMMANDS: "commands"}


class Answers:
    """Outcome records as the replica writes them; each acknowledged when the test says."""

    def __init__(self) -> None:
        self.written: list[CommandOutcome] = []
        self.acks: list[asyncio.Future[None]] = []

    def write(self, outcome: CommandOutcome) -> asyncio.Future[None]:
        self.written.append(outcome)
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.acks.append(ack)
        return ack

    def acknowledge(self) -> None:
        for ack in self.acks:
            if not ack.done():
                ack.set_result(None)


def answering(
    view: PublishedView,
    answers: Answers,
    on_failure: Callable[[BaseException], None] = lambda error: None,
) -> PartitionProcessor:
    writer = RecordingChangelog()
    return PartitionProcessor(
        partition=3,
        topics=TOPICS,
        view=view,
        assembler=ManifestAssembler(expiry=dt.timedelta(hours=1), max_pending_items=1000),
        routing=ROUTING,
        guard=DeletionGuard(max_share=0.5, min_count=3),
        executor=cast(OperationExecutor, NothingQueued(writer)),
        writer=writer,
        dead_letters=cast(DeadLetterSink, None),
        metrics=RelayMetrics.create(CollectorRegistry(), version="t"),
        max_value_bytes=1 << 20,
        clock=lambda: NOW,
        on_failure=on_failure,
        write_outcome=answers.write,
    )


def at(offset: int, sent: OperatorCommand) -> SourceRecord:
    return on_topic(offset, sent)._replace(partition=3)


async def settle(work: PartitionProcessor) -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_refused_command_is_answered_and_its_offset_waits_for_the_answer() -> None:
    answers = Answers()
    work = answering(PublishedView(), answers)

    await work.handle(at(0, command(AgencyAction.PAUSE, "agence-nowhere")))
    await settle(work)

    [answer] = answers.written
    assert (answer.partition, answer.offset, answer.outcome) == (3, 0, Refusal.UNKNOWN_AGENCY)
    assert answer.requested_by == "cli:someone@somewhere"
    assert "routing file" in answer.detail
    assert work.committable() == {"commands": 0}  # not acknowledged: a crash decides it again
    answers.acknowledge()
    await settle(work)
    assert work.committable() == {"commands": 1}


async def test_a_pause_carried_out_is_answered_before_its_offset_moves_on() -> None:
    answers = Answers()
    work = answering(PublishedView(), answers)

    await work.handle(at(0, command(AgencyAction.PAUSE, "agence-nantes")))
    await settle(work)

    [answer] = answers.written
    assert answer.carried_out
    assert answer.summary == "paused"
    assert work.committable() == {"commands": 0}
    answers.acknowledge()
    await settle(work)
    assert work.committable() == {"commands": 1}


def parked(building: str, document: str, reason: str) -> DocumentRecord:
    return DocumentRecord(
        key=DocKey("agence-nantes", building, document),
        status=DocStatus.PARKED,
        sha256="0" * 64,
        module=Module("ag"),
        seen_at=NOW,
        document_date=NOW.date(),
        size_bytes=10,
        parked_reason=reason,
    )


async def test_a_retry_says_what_stays_parked_and_why() -> None:
    view = PublishedView()
    view.apply(parked("bat-99", "doc-1", "unmapped_building"))
    answers = Answers()
    work = answering(view, answers)

    await work.handle(at(0, command(AgencyAction.RETRY, "agence-nantes")))
    await settle(work)

    [answer] = answers.written
    assert answer.carried_out
    assert (answer.retried, answer.still_parked) == (0, {"unmapped_building": 1})
    assert answer.sentence == (
        "nothing to retry: bat-99 is unmapped; fix the routing file and restart"
    )


async def test_an_outcome_record_on_the_topic_is_never_carried_out() -> None:
    answers = Answers()
    work = answering(PublishedView(), answers)
    forged = at(0, command(AgencyAction.PAUSE, "agence-nantes"))
    forged = forged._replace(headers=((RECORD_HEADER, OUTCOME_MARK),))

    await work.handle(forged)
    await settle(work)

    assert answers.written == []
    assert work.view.agency("agence-nantes") is None
    assert work.committable() == {"commands": 1}


def test_an_outcome_survives_its_record() -> None:
    sent = command(AgencyAction.APPROVE, "agence-nantes")
    outcome = carried_out_outcome(sent, partition=2, offset=7, at=NOW, documents=1, uploads=12)

    value, headers = encode_outcome(outcome)

    assert headers == [(RECORD_HEADER, OUTCOME_MARK)]
    assert decode_outcome(value) == outcome
    assert orjson.loads(value)["plan"] == "ab" * 8
    assert decode_outcome(b"{not json") is None


def test_outcomes_are_said_once_per_distinct_answer_with_partition_ranges() -> None:
    sent = command(AgencyAction.APPROVE, "agence-nantes")
    approved = [
        carried_out_outcome(sent, partition=p, offset=1, at=NOW, documents=1, uploads=0)
        for p in (0, 1, 2, 4, 5)
    ]
    stale = refusal_outcome(sent, Refusal.PLAN_CHANGED, partition=3, offset=1, at=NOW)

    lines = [describe(o, partitions) for o, partitions in grouped([*approved, stale])]

    assert lines == [
        "approved on partitions 0-2, 4-5: 0 uploads started",
        "refused on partition 3: the plan changed since it was shown; run `chouette-relay plan`"
        " again",
    ]
    assert partition_ranges([7]) == "partition 7"


def test_a_discard_and_a_backfill_pause_say_what_they_did() -> None:
    discard = command(HeldAction.DISCARD, "agence-nantes", "bat-1")
    backfill = command(AgencyAction.PAUSE, "agence-nantes").model_copy(
        update={"backfill_only": True}
    )
    assert (
        carried_out_outcome(discard, partition=0, offset=0, at=NOW, documents=2, uploads=0).sentence
        == "discarded: 2 documents decided"
    )
    assert (
        carried_out_outcome(backfill, partition=0, offset=0, at=NOW, documents=1, uploads=0).summary
        == "first publication paused"
    )


def test_the_deployed_commands_topic_keeps_the_history_as_long_as_one_the_relay_creates() -> None:
    manifests = Path(__file__).parents[2] / "deploy" / "k8s" / "base" / "kafkatopics.yaml"
    topics = {
        t["spec"]["topicName"]: t["spec"]
        for t in yaml.safe_load_all(manifests.read_text(encoding="utf-8"))
    }
    retention = topics["chouette-relay.commands.v1"]["config"]["retention.ms"]

    assert retention == COMMANDS_RETENTION_MS
    assert int(COMMANDS_TOPIC_CONFIG["retention.ms"]) >= 90 * 24 * 3600 * 1000


def test_the_history_table_gives_each_action_its_outcomes_and_an_approve_its_fingerprint() -> None:
    approve = {
        "requested_at": "2026-01-02T03:04:05+00:00",
        "requested_by": "cli:alice@laptop",
        "command": "approve",
        "agency": "agence-nantes",
        "plan": "ab" * 8,
        "said": ["approved on partitions 0-1: 3 uploads started", "no outcome from partition 2"],
    }
    pause = approve | {"command": "pause", "scope": "backfill", "said": []}
    del pause["plan"]

    lines = render_readable("history", {"history": [approve, pause]}).splitlines()

    assert lines[1].startswith("2026-01-02 03:04:05  cli:alice@laptop")
    assert lines[1].endswith(
        "agence-nantes                approved on partitions 0-1: 3 uploads started"
    )
    assert lines[2].strip() == "no outcome from partition 2"
    assert lines[3].strip() == f"plan {'ab' * 8}"
    assert "pause (backfill)" in lines[4]
    assert lines[4].endswith("(no outcome)")


async def test_an_outcome_that_cannot_be_written_stops_the_relay_and_keeps_the_command() -> None:
    answers, failures = Answers(), list[BaseException]()
    work = answering(PublishedView(), answers, on_failure=failures.append)

    await work.handle(at(0, command(AgencyAction.PAUSE, "agence-nowhere")))
    answers.acks[0].set_exception(RuntimeError("the commands topic refused the write"))
    await settle(work)

    assert [str(error) for error in failures] == ["the commands topic refused the write"]
    assert work.committable() == {"commands": 0}  # read again after the restart, answered then
