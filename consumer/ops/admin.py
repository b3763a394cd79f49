"""The operator's actions, one implementation for the command line and the admin HTTP endpoints.

They talk to Kafka directly, not to one replica: listings read every partition of the relay's
state topic (or the dead-letter topic), and actions write a command that the replicas owning the
building or the agency carry out (see ``consumer.core.commands``). Nothing here needs to know
which pod owns what, so the CLI and any replica's admin endpoint give the same answers.
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
from collections import Counter
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaProducer

from consumer.core.commands import AgencyAction, Finding, HeldAction, OperatorCommand
from consumer.core.deadletter import DEAD_LETTER_REASONS, NO_REPLAY_FIXES
from consumer.core.outcomes import CommandOutcome, describe, grouped, partition_ranges
from consumer.core.routing import RoutingTable
from consumer.core.state import DocStatus, DocumentRecord
from consumer.core.view import PublishedView
from consumer.errors import ConfigError
from consumer.kafka.changelog import restore_partition, topic_partitions
from consumer.kafka.commands import send_command
from consumer.kafka.connection import KafkaConnection, kafka_connection
from consumer.kafka.outcomes import read_command_log, wait_for_outcomes
from consumer.kafka.startup import start_client
from consumer.ops.replay import read_dead_letters, replay, replayed_already
from consumer.settings import Settings

Action = HeldAction | AgencyAction
NO_SUCH_DEAD_LETTER = "no such dead letter"
_DEAD_LETTER_ID = re.compile(r"[A-Za-z0-9._-]{1,249}/[0-9]{1,10}/[0-9]{1,19}")
_FINGERPRINT = re.compile(r"[0-9a-f]{16,64}")


def require_kafka(settings: Settings) -> KafkaConnection:
    if not settings.kafka.bootstrap_servers:
        raise ConfigError(
            "set CHOUETTE_RELAY_KAFKA__BOOTSTRAP_SERVERS (and the topic names, if not the "
            "defaults) to reach the relay's topics"
        )
    return kafka_connection(settings.kafka)


class Operator:
    """Lists and commands across the whole cluster; an async context manager.

    Given the running relay's producer it uses it; otherwise it starts (and stops) its own.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        producer: AIOKafkaProducer | None = None,
        routing: RoutingTable | None = None,
    ) -> None:
        self.settings = settings
        self.routing = routing
        self.connection = require_kafka(settings)
        self._producer = producer
        self._owns_producer = producer is None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._owns_producer and self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    async def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(**self.connection.options(), acks="all")
            await start_client(producer, self.connection)
            self._producer = producer
        return self._producer

    # -- commands ----------------------------------------------------------------------------
    async def queue(
        self,
        action: Action,
        agency_id: str,
        building_id: str | None = None,
        *,
        requested_by: str,
        plan: str | None = None,
        plan_shares: tuple[str, ...] = (),
        findings: tuple[Finding, ...] = (),
        backfill_only: bool = False,
    ) -> dict[str, Any]:
        """Write one command; the replicas owning the building (or every partition of the
        agency) carry it out in order with the input. Raises ``ValueError`` on a bad request,
        ``UnknownTargetError`` for an agency or building the routing file does not know."""
        command = OperatorCommand(
            command=action,
            agency_id=agency_id,
            building_id=building_id,
            plan=plan,
            plan_shares=plan_shares,
            findings=findings,
            backfill_only=backfill_only,
            requested_at=dt.datetime.now(dt.UTC),
            requested_by=requested_by,
        )
        self.check_target(agency_id, building_id)
        key = self.settings.kafka.commands_key()
        written = await send_command(
            await self.producer(),
            self.settings.kafka.commands_topic,
            command,
            secret=None if key is None else key.get_secret_value().encode(),
        )
        queued: dict[str, Any] = {"queued": action.value, "agency": agency_id}
        if building_id is not None:
            queued["building"] = building_id
        if plan is not None:
            queued["plan"] = plan
        if findings:
            queued["findings"] = len(findings)
        if backfill_only:
            queued["scope"] = "backfill"
        queued["partitions"] = [{"partition": p, "offset": o} for p, o in written]
        return queued

    async def outcomes(
        self, written: list[tuple[int, int]], *, timeout_s: float
    ) -> dict[tuple[int, int], CommandOutcome]:
        """The outcomes the owning replicas wrote for the commands at ``written`` (partition,
        offset), those that came within ``timeout_s``."""
        return await wait_for_outcomes(
            self.connection, self.settings.kafka.commands_topic, written, timeout_s=timeout_s
        )

    async def history(self, agency_id: str | None = None) -> list[dict[str, Any]]:
        """Every operator action the commands topic holds (of one agency, if given), oldest
        first: who asked, when, what, and the outcome of each partition it was written to."""
        log = await read_command_log(self.connection, self.settings.kafka.commands_topic)
        # An agency's command is one record per partition, the same value in each: one action.
        actions: dict[bytes, list[tuple[int, int]]] = {}
        commands: dict[bytes, OperatorCommand] = {}
        for logged in log.commands:
            if agency_id in (None, logged.command.agency_id):
                actions.setdefault(logged.value, []).append((logged.partition, logged.offset))
                commands[logged.value] = logged.command
        entries = []
        for value, places in actions.items():
            command = commands[value]
            found = [log.outcomes[place] for place in places if place in log.outcomes]
            entry: dict[str, Any] = {
                "requested_at": command.requested_at.isoformat(),
                "requested_by": command.requested_by,
                "command": command.command.value,
                "agency": command.agency_id,
            }
            if command.building_id is not None:
                entry["building"] = command.building_id
            if command.plan is not None:
                entry["plan"] = command.plan
            if command.backfill_only:
                entry["scope"] = "backfill"
            entry["partitions"] = [{"partition": p, "offset": o} for p, o in sorted(places)]
            entry["outcomes"] = [
                {
                    "partitions": partitions,
                    "where": partition_ranges(partitions),
                    "outcome": str(outcome.outcome),
                    "summary": outcome.summary,
                    "detail": outcome.detail,
                    "decided_at": outcome.decided_at.isoformat(),
                }
                for outcome, partitions in grouped(found)
            ]
            entry["unanswered"] = sorted(p for p, o in places if (p, o) not in log.outcomes)
            entry["said"] = [describe(o, partitions) for o, partitions in grouped(found)]
            if entry["unanswered"]:
                entry["said"].append(f"no outcome from {partition_ranges(entry['unanswered'])}")
            entries.append((command.requested_at, entry))
        return [entry for _, entry in sorted(entries, key=lambda e: e[0])]

    async def plan(self, agency_id: str | None) -> tuple[Any, dict[str, str]]:
        """The dry run of what first publications would send, and each agency's fingerprint."""
        if agency_id is not None:
            self.check_target(agency_id)
        from consumer.ops.dryrun import plan_with_fingerprints  # noqa: PLC0415 - heavy, rarely used

        return await plan_with_fingerprints(self.settings, self.routing_table(), agency=agency_id)

    async def plan_with_shares(
        self, agency_id: str | None
    ) -> tuple[Any, dict[str, str], dict[str, tuple[str, ...]]]:
        """The dry run, each agency's fingerprint, and each partition's share in it."""
        from consumer.ops.dryrun import plan_with_shares  # noqa: PLC0415 - heavy, rarely used

        if agency_id is not None:
            self.check_target(agency_id)
        return await plan_with_shares(self.settings, self.routing_table(), agency=agency_id)

    async def approve(self, agency_id: str, plan: str, *, requested_by: str) -> dict[str, Any]:
        """Start the agency's first publication, if its plan is still the one approved. The
        command carries the plan's share of every partition: each owning replica checks its own
        again against the plan it computes when the command arrives."""
        self.check_target(agency_id)
        if not _FINGERPRINT.fullmatch(plan):
            raise ValueError(
                f"{plan!r} is not a plan fingerprint: give the hexadecimal one that "
                f"chouette-relay plan --agency {agency_id} prints"
            )
        dry_run, fingerprints, shares = await self.plan_with_shares(agency_id)
        current = fingerprints[agency_id]
        if current != plan:
            # A typo and a plan that changed since it was shown look alike from here: the summary
            # comes before the fingerprint, so the one approved is the one read.
            lines = [line for line in dry_run.lines if line.agency_id == agency_id]
            uploads = sum(line.uploads for line in lines)
            size = sum(line.upload_bytes for line in lines) / 1048576
            deletes = sum(line.deletes for line in lines)
            raise PlanChangedError(
                f"{plan} does not match the plan of {agency_id}, which is now {uploads} uploads "
                f"({size:.1f} MiB) and {deletes} withdrawals in {len(lines)} building modules; "
                f"to approve that plan: chouette-relay approve {agency_id} --plan {current} "
                f"(the full plan: chouette-relay plan --agency {agency_id})"
            )
        return await self.queue(
            AgencyAction.APPROVE,
            agency_id,
            requested_by=requested_by,
            plan=plan,
            plan_shares=shares[agency_id],
        )

    def check_target(self, agency_id: str, building_id: str | None = None) -> None:
        """Raise ``UnknownTargetError`` unless the routing file knows the agency (and maps the
        building): the owning replica would refuse the command, and a typo must not pass for
        an action taken."""
        routing = self.routing_table()
        config = routing.agency(agency_id)
        if config is None:
            raise UnknownTargetError("agency", agency_id, known=routing.agencies)
        if building_id is not None and building_id not in config.condominia:
            raise UnknownTargetError(
                "building", building_id, known=config.condominia, of=f" of agency {agency_id}"
            )

    def routing_table(self) -> RoutingTable:
        if self.routing is None:
            if self.settings.routing_file is None:
                raise ConfigError("set CHOUETTE_RELAY_ROUTING_FILE: the plan follows the routing")
            from consumer.core.routing import load_routing  # noqa: PLC0415

            self.routing = load_routing(self.settings.routing_file)
        return self.routing

    # -- listings ----------------------------------------------------------------------------
    async def views(self) -> list[PublishedView]:
        """The published view of every partition, read from the state topic."""
        topic = self.settings.kafka.state_topic
        partitions = await topic_partitions(self.connection, topic) or 0
        views = []
        for partition in range(partitions):
            view = PublishedView()
            await restore_partition(
                connection=self.connection, topic=topic, partition=partition, view=view
            )
            views.append(view)
        return views

    async def held(self) -> list[dict[str, Any]]:
        """Every building whose manifest the mass-deletion guard holds, with what waits."""
        views = await self.views()
        entries = held_entries(
            (record for view in views for record in view.waiting()), by_snapshot=True
        )
        # Since when it waits: the taken_at of the manifest held (its snapshot_id, the question).
        taken_at: dict[str, str] = {}
        for view in views:
            for place in view.buildings():
                building = view.building(place.agency_id, place.building_id)
                if building is not None and building.held is not None:
                    held = building.held
                    taken_at[held.snapshot_id] = held.taken_at.isoformat()
        for entry in entries:
            entry["since"] = taken_at.get(entry["snapshot_id"])
        return entries

    async def parked(self, agency_id: str | None = None) -> list[dict[str, Any]]:
        """Every parked document (of one agency, if given) with the reason it waits."""
        if agency_id is not None:
            self.check_target(agency_id)
        found = [
            parked_entry(record)
            for view in await self.views()
            for record in view.parked()
            if agency_id is None or record.key.agency_id == agency_id
        ]
        return sorted(found, key=lambda e: (e["agency"], e["building"], e["document"]))

    async def dead_letters(
        self, *, reason: str | None = None, source_topic: str | None = None
    ) -> list[dict[str, Any]]:
        """Every dead letter (of one reason, or one source topic, if given), oldest first."""
        if reason is not None:
            _check_reason(reason)
        letters = await read_dead_letters(self.connection, self.settings.kafka.dead_letter_topic)
        chosen = [
            letter
            for letter in letters
            if reason in (None, letter.reason) and source_topic in (None, letter.source_topic)
        ]
        replayed = (await replayed_already(self.connection, chosen)).replayed_at if chosen else {}
        return [letter.listing(replayed.get(letter.id)) for letter in chosen]

    async def replay(
        self, ids: list[str], *, reason: str | None = None, force: bool = False
    ) -> list[dict[str, Any]]:
        """Re-publish the dead letters named by ``ids`` (or all of one ``reason``, replayed
        copies left out) to their source partition, each once unless ``force``; what happened
        to each. One whose reason is in its own bytes (``NO_REPLAY_FIXES``) needs ``force``."""
        if not ids and reason is None:
            raise ValueError("name the dead letters to replay (ids) or a reason")
        malformed = [i for i in ids if not _DEAD_LETTER_ID.fullmatch(i)]
        if malformed:
            raise ValueError(
                f"{malformed[0]!r} is not a dead letter id: topic/partition/offset, as listed"
            )
        if reason is not None:
            _check_reason(reason)
        letters = await read_dead_letters(self.connection, self.settings.kafka.dead_letter_topic)
        # A reason selects originals only: the dead letter of a replayed copy is the same
        # record again, and replaying it too would add one more dead letter per run.
        chosen = [
            letter
            for letter in letters
            if letter.id in ids
            or (reason is not None and letter.reason == reason and letter.replay_of is None)
        ]
        found = {letter.id for letter in chosen}
        unfixable = [] if force else [c for c in chosen if c.reason in NO_REPLAY_FIXES]
        chosen = [letter for letter in chosen if letter not in unfixable]
        results = await replay(self.connection, chosen, force=force)
        results += [
            {
                "id": letter.id,
                "outcome": "refused",
                "why": f"{letter.reason}: the same bytes would be refused again; use --force",
            }
            for letter in unfixable
        ]
        missing = [
            {"id": i, "outcome": "refused", "why": NO_SUCH_DEAD_LETTER}
            for i in ids
            if i not in found
        ]
        return results + missing


class PlanChangedError(ValueError):
    """The plan an operator approved is no longer the one the relay would carry out."""


class UnknownTargetError(ValueError):
    """A command or a listing names an agency or building that the routing file does not know."""

    def __init__(self, what: str, name: str, *, known: Iterable[str], of: str = "") -> None:
        self.what, self.name = what, name
        self.closest = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
        hint = (
            f"; did you mean {' or '.join(self.closest)}?"
            if self.closest
            else "; no known name is close to it"
        )
        super().__init__(f"{what} {name}{of} is not in the routing file{hint}")


def _check_reason(reason: str) -> None:
    if reason not in DEAD_LETTER_REASONS:
        known = ", ".join(sorted(DEAD_LETTER_REASONS))
        raise ValueError(f"{reason!r} is not a dead-letter reason; one of {known}")


def held_entries(
    waiting: Iterable[DocumentRecord], *, by_snapshot: bool = False
) -> list[dict[str, Any]]:
    """Per building (and held snapshot), what waits for the operator's decision: held
    withdrawals and uploads, ``documents`` counting both."""
    found: dict[tuple[str, str, str], Counter[DocStatus]] = {}
    for record in waiting:
        snapshot = (record.held_by or "") if by_snapshot else ""
        place = (record.key.agency_id, record.key.building_id, snapshot)
        found.setdefault(place, Counter())[record.status] += 1
    entries = []
    for (agency, building, snapshot), counts in sorted(found.items()):
        withdrawals, uploads = counts[DocStatus.DELETE_HELD], counts[DocStatus.UPLOAD_HELD]
        entry: dict[str, Any] = {"agency": agency, "building": building}
        if by_snapshot:
            entry["snapshot_id"] = snapshot
        entry |= {
            "documents": withdrawals + uploads,
            "withdrawals": withdrawals,
            "uploads": uploads,
        }
        entries.append(entry)
    return entries


def parked_entry(record: DocumentRecord) -> dict[str, Any]:
    """How a parked document is shown to an operator."""
    document = record.document
    return {
        "agency": record.key.agency_id,
        "building": record.key.building_id,
        "document": record.key.document_id,
        "title": document.title if document is not None else None,
        "module": record.module.value,
        # A parked record without its document is a withdrawal the partner refused.
        "operation": "upload" if document is not None else "withdraw",
        "reason": record.parked_reason,
    }


def requester(kind: str, who: str) -> str:
    return f"{kind}:{who}"[:200]
