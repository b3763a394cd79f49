"""The concurrent part of the relay, as a state machine: any order of the two input topics, a
partner that carries a create out after the relay gave up on it, and crashes at any step.

One partition's real processor, executor, scheduler and partner client run against the real
ChouetteCopro sandbox on loopback; the changelog is kept in memory, and only what it
acknowledged survives a crash. A crash drops everything in memory (the view, queued work, the
offsets not committed), restores a new view from the acknowledged records, settles its upload
intents and reads the input again from the offsets committed just before it: the most a
commit could have claimed. At quiescence ChouetteCopro holds one copy of each document, exactly
the versions LSC's newest complete manifests and events say should be published.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import time
import uuid
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, NamedTuple

import orjson
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule
from prometheus_client import CollectorRegistry

from consumer.app.partition import partition_processor
from consumer.app.processor import COMMANDS, DOCUMENTS, MANIFESTS, PartitionProcessor
from consumer.core.guard import DeletionGuard
from consumer.core.records import SourceRecord
from consumer.core.routing import RoutingTable
from consumer.core.state import StateRecord
from consumer.core.state_codec import encode_state
from consumer.core.view import PublishedView
from consumer.local.pdf import make_pdf
from consumer.local.sandbox import Account, SandboxServer
from consumer.local.sandbox.scripted import Answer, Scripted
from consumer.metrics import RelayMetrics
from consumer.partner.breaker import BreakerPolicy
from consumer.partner.client import ChouetteCoproClient
from consumer.partner.content import ContentFetcher
from consumer.partner.keys import ApiKeyStore
from consumer.partner.ratelimit import RateLimit
from consumer.partner.reconcile import reconcile_partition
from consumer.partner.scheduler import RetryPolicy, Scheduler
from consumer.settings import PartnerSettings, Settings
from tests.writers import WritesAtOnce

pytestmark = pytest.mark.integration

AGENCY, KEY = "agence-a", "key-agence-a"
BUILDINGS = {"bat-1": "c-1", "bat-2": "c-2"}
TOPICS = {DOCUMENTS: "documents", MANIFESTS: "manifests", COMMANDS: "commands"}
TIMEOUT_S, SETTLE_S = 0.4, 0.4
LATE_S = 0.5  # a create carried out after the client gave up, within timeout + settle
QUIET_S = 60.0  # quiescence is reached well within this; beyond it the test fails


class Acknowledged(NamedTuple):
    key: bytes | None
    value: bytes | None


class MemoryChangelog(WritesAtOnce):
    """The state topic: a record is acknowledged once written; a crash keeps only those."""

    def __init__(self) -> None:
        self.records: list[Acknowledged] = []

    async def write(self, record: StateRecord) -> None:
        await asyncio.sleep(0)  # the broker's acknowledgement comes later than the call
        self.records.append(Acknowledged(*encode_state(record)))


class DeadLetterList:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    async def send(self, source: SourceRecord, *, reason: str, detail: str) -> None:
        self.reasons.append(reason)


class Relay:
    """One partition of a running relay: what a crash throws away."""

    def __init__(self, processor: PartitionProcessor, scheduler: Scheduler, closers: list[Any]):
        self.processor = processor
        self.scheduler = scheduler
        self._closers = closers

    async def close(self) -> None:
        await self.processor.close()
        for closer in reversed(self._closers):
            await closer()


def _pdf(document_id: str, version: int) -> dict[str, Any]:
    data = make_pdf(f"{document_id} v{version}")
    return {
        "media_type": "application/pdf",
        "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "inline_base64": base64.b64encode(data).decode(),
    }


def _ts(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


class RuntimeMachine(RuleBasedStateMachine):
    """LSC publishes, the relay reads in any order and crashes; the partner ends right."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = TemporaryDirectory()
        keys = Path(self.tmp.name)
        (keys / AGENCY).write_text(KEY + "\n", encoding="utf-8")
        self.keys = ApiKeyStore(keys)
        self.sandbox = SandboxServer(accounts={KEY: Account(frozenset(BUILDINGS.values()))})
        self.loop.run_until_complete(self.sandbox.start())
        self.changelog = MemoryChangelog()
        self.dead_letters = DeadLetterList()
        # LSC's truth per building: document id -> (version, content); and what it published.
        self.truth: dict[str, dict[str, tuple[int, dict[str, Any]]]] = {b: {} for b in BUILDINGS}
        self.inputs: dict[str, list[SourceRecord]] = {DOCUMENTS: [], MANIFESTS: []}
        self.read: dict[str, int] = {DOCUMENTS: 0, MANIFESTS: 0}
        self.clock = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
        self.relay: Relay | None = None
        self.crashes = 0

    # -- the relay -------------------------------------------------------------------------------
    async def _start(self, *, restored_after: float) -> Relay:
        settings = Settings(
            partner=PartnerSettings(
                base_url=self.sandbox.base_url,
                api_keys_dir=Path(self.tmp.name),
                timeout_s=TIMEOUT_S,
                in_doubt_settle_s=SETTLE_S,
            )
        )
        routing = RoutingTable.from_mapping(
            {
                "agencies": {
                    AGENCY: {
                        "modules": ["ag"],
                        "audiences": ["building"],
                        "first_publication": "history",
                        "approval": "auto",
                        "condominia": dict(BUILDINGS),
                    }
                }
            }
        )
        view = PublishedView()
        view.restore(self.changelog.records)
        scheduler = Scheduler(
            concurrency=4,
            default_rate_limit=RateLimit(rate_per_second=1000.0, burst=100),
            retry=RetryPolicy(in_doubt_seconds=SETTLE_S, base_seconds=0.05, cap_seconds=0.2),
            breaker=BreakerPolicy(failure_threshold=1000, cooldown_seconds=0.1),
        )
        await scheduler.__aenter__()
        partner = ChouetteCoproClient(
            base_url=self.sandbox.base_url, api_keys=self.keys, timeout_s=TIMEOUT_S
        )
        await partner.__aenter__()
        content = ContentFetcher(allowed_hosts=(), max_bytes=1 << 20, timeout_s=5.0)
        await content.__aenter__()
        closers = [
            scheduler.close,
            lambda: partner.__aexit__(None, None, None),
            lambda: content.__aexit__(None, None, None),
        ]
        await reconcile_partition(
            view=view,
            writer=self.changelog,
            scheduler=scheduler,
            partner=partner,
            not_before=restored_after + TIMEOUT_S + SETTLE_S,
        )
        processor = partition_processor(
            0,
            settings=settings,
            topics=TOPICS,
            routing=routing,
            guard=DeletionGuard(max_share=1.0, min_count=1_000_000),
            view=view,
            writer=self.changelog,
            scheduler=scheduler,
            partner=partner,
            content=content,
            dead_letters=self.dead_letters,  # type: ignore[arg-type]  # the one method it calls
            metrics=RelayMetrics.create(CollectorRegistry(), version="test"),
            on_failure=self._failed,
        )
        processor.retry_parked()
        return Relay(processor, scheduler, closers)

    def _failed(self, error: BaseException) -> None:
        raise AssertionError(f"the relay met an infrastructure failure: {error!r}")

    def _run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def _processor(self) -> PartitionProcessor:
        assert self.relay is not None
        return self.relay.processor

    # -- LSC -------------------------------------------------------------------------------------
    def _tick(self) -> dt.datetime:
        self.clock += dt.timedelta(seconds=1)
        return self.clock

    def _append(self, topic: str, building: str, event: dict[str, Any]) -> None:
        records = self.inputs[topic]
        records.append(
            SourceRecord(
                TOPICS[topic],
                0,
                len(records),
                int(time.time() * 1000),
                f"{AGENCY}:{building}".encode(),
                orjson.dumps(event),
                (("event-type", event["event_type"].encode()), ("schema-version", b"1")),
            )
        )

    def _item(self, document_id: str, version: int, content: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": document_id,
            "module": "ag",
            "category": "Documents",
            "title": f"{document_id} v{version}",
            "document_date": "2025-06-01",
            "audience": "building",
            "content": content,
        }

    def _manifest(self, building: str) -> None:
        items = [self._item(d, v, c) for d, (v, c) in sorted(self.truth[building].items())]
        event = {
            "schema_version": 1,
            "event_type": "manifest-snapshot",
            "snapshot_id": str(uuid.uuid4()),
            "taken_at": _ts(self._tick()),
            "agency_id": AGENCY,
            "building_id": building,
            "modules": ["ag", "contrats", "carnet_entretien", "diagnostics"],
            "part": 1,
            "parts": 1,
            "item_count": len(items),
            "items": items,
        }
        self._append(MANIFESTS, building, event)

    # -- rules -----------------------------------------------------------------------------------
    @initialize()
    def start(self) -> None:
        self.relay = self._run(self._start(restored_after=0.0))
        for building in sorted(BUILDINGS):
            # Every building keeps one document: a manifest listing nothing would be held by the
            # mass-deletion guard, which leaves the outcome to an operator.
            self.lsc_publishes_a_version(building, 0)

    @rule(building=st.sampled_from(sorted(BUILDINGS)), number=st.integers(0, 3))
    def lsc_publishes_a_version(self, building: str, number: int) -> None:
        document_id = f"{building}-doc-{number}"
        version = self.truth[building].get(document_id, (0, {}))[0] + 1
        content = _pdf(document_id, version)
        self.truth[building][document_id] = (version, content)
        event = {
            "schema_version": 1,
            "event_type": "document-created",
            "event_id": str(uuid.uuid4()),
            "occurred_at": _ts(self._tick()),
            "agency_id": AGENCY,
            "building_id": building,
            "document": self._item(document_id, version, content),
        }
        self._append(DOCUMENTS, building, event)

    @rule(building=st.sampled_from(sorted(BUILDINGS)), number=st.integers(1, 3))
    def lsc_removes_a_document(self, building: str, number: int) -> None:
        self.truth[building].pop(f"{building}-doc-{number}", None)
        self._tick()

    @rule(building=st.sampled_from(sorted(BUILDINGS)))
    def lsc_publishes_a_manifest(self, building: str) -> None:
        self._manifest(building)

    @rule(topic=st.sampled_from([DOCUMENTS, MANIFESTS]), count=st.integers(1, 3))
    def the_relay_reads(self, topic: str, count: int) -> None:
        records = self.inputs[topic][self.read[topic] : self.read[topic] + count]
        if records:
            self.read[topic] += len(records)
            self._run(self._processor().handle_batch(records))

    @rule()
    def the_partner_carries_a_create_out_late(self) -> None:
        self.sandbox.script("POST", Scripted(Answer.LATE, delay_s=LATE_S))

    @rule(seconds=st.sampled_from([0.0, 0.05, 0.3]))
    def time_passes(self, seconds: float) -> None:
        self._run(asyncio.sleep(seconds))

    @rule()
    def the_relay_crashes(self) -> None:
        processor = self._processor()
        committed = processor.committable()
        self._check_committed(committed)
        self._run(self.relay.close() if self.relay else asyncio.sleep(0))
        self.crashes += 1
        for topic in (DOCUMENTS, MANIFESTS):
            self.read[topic] = committed.get(TOPICS[topic], self.read[topic])
        self.relay = self._run(self._start(restored_after=time.time()))

    # -- checks ----------------------------------------------------------------------------------
    def _check_committed(self, committed: dict[str, int]) -> None:
        for topic in (DOCUMENTS, MANIFESTS):
            offset = committed.get(TOPICS[topic])
            assert offset is None or offset <= self.read[topic], "committed past what was read"

    def teardown(self) -> None:
        try:
            if self.relay is not None:
                self._run(self._quiesce())
        finally:
            if self.relay is not None:
                self._run(self.relay.close())
            self._run(self.sandbox.close())
            self.loop.close()
            self.tmp.cleanup()

    async def _quiesce(self) -> None:
        """LSC's final word on every building, everything read, then the partner judged."""
        for building in sorted(BUILDINGS):
            self._manifest(building)
        processor = self._processor()
        for topic in (DOCUMENTS, MANIFESTS):
            await processor.handle_batch(self.inputs[topic][self.read[topic] :])
            self.read[topic] = len(self.inputs[topic])
        expected = {
            document_id: content["sha256"]
            for documents in self.truth.values()
            for document_id, (_, content) in documents.items()
        }
        ends = {TOPICS[t]: len(self.inputs[t]) for t in (DOCUMENTS, MANIFESTS)}

        def finished() -> bool:
            committable = processor.committable()
            return all(committable.get(topic, end) == end for topic, end in ends.items())

        deadline = asyncio.get_running_loop().time() + QUIET_S
        while asyncio.get_running_loop().time() < deadline:
            if (
                finished()
                and processor.pending_operations == 0
                and self.sandbox.in_flight == 0
                and self._partner() == expected
                and all(n == 1 for n in self._copies().values())
            ):
                break
            await asyncio.sleep(0.05)
        assert self.dead_letters.reasons == []
        assert {r: n for r, n in self._copies().items() if n > 1} == {}, "a document twice"
        assert self._partner() == expected
        assert finished(), f"work left unfinished: {processor.committable()} of {ends}"

    def _copies(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for document in self.sandbox.documents():
            if document.reference is not None:
                counts[document.reference] = counts.get(document.reference, 0) + 1
        return counts

    def _partner(self) -> dict[str, str | None]:
        return {d.reference: d.sha256 for d in self.sandbox.documents() if d.reference}


TestRuntimeModel = RuntimeMachine.TestCase
TestRuntimeModel.settings = settings(max_examples=15, stateful_step_count=20, deadline=None)
