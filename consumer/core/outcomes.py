"""What became of an operator command: the outcome record its owning replica writes back.

When the replica owning a partition of the commands topic has decided a command read there
(carried out or refused), it writes an outcome record to the same partition, marked by the
``chouette-relay-record: outcome`` header, naming the command by its partition and offset. The
CLI waits for those records to say in words what happened, and ``history`` joins every command
with them. Replicas skip marked records: an outcome is never carried out, so a forged one steers
nothing. A command read again after a crash is decided again and its outcome written again;
readers keep the last outcome of each (partition, offset). Pure: encoding, decoding and the
sentences; the producer and the reader are the Kafka edge's (``consumer/kafka/outcomes.py``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from consumer.core.commands import AgencyAction, HeldAction, OperatorCommand, Refusal
from consumer.core.patterns import IDENTIFIER_PATTERN

RECORD_HEADER = "chouette-relay-record"
"""The header that marks a record of the commands topic that is not a command."""
OUTCOME_MARK = b"outcome"
CARRIED_OUT = "carried_out"

_Identifier = Annotated[str, StringConstraints(pattern=IDENTIFIER_PATTERN)]
_Text = Annotated[str, StringConstraints(max_length=1000)]

# Why each refusal happened and what to do, as the operator reads it.
_REFUSED: dict[Refusal, str] = {
    Refusal.UNKNOWN_AGENCY: "the agency is not in the replica's routing file",
    Refusal.UNKNOWN_BUILDING: "the building is not mapped in the replica's routing file",
    Refusal.UNSIGNED: "the command is not signed, and the replicas hold a command key "
    "(CHOUETTE_RELAY_KAFKA__COMMANDS_KEY_FILE)",
    Refusal.BAD_SIGNATURE: "the command is not signed with the replicas' command key "
    "(CHOUETTE_RELAY_KAFKA__COMMANDS_KEY_FILE)",
    Refusal.PLAN_CHANGED: "the plan changed since it was shown; run `chouette-relay plan` again",
    Refusal.PLAN_UNCHECKED: "the approve carries no plan shares (an older CLI wrote it); "
    "approve again with this one",
}

# What stays parked after a retry, and the fix, per parked reason (the part before its ':').
_STAYS_PARKED: dict[str, str] = {
    "unmapped_building": "fix the routing file and restart",
}


def is_outcome(headers: Iterable[tuple[str, bytes | None]]) -> bool:
    """Whether a record of the commands topic is an outcome (or any record not a command)."""
    return any(name == RECORD_HEADER for name, _ in headers)


class CommandOutcome(BaseModel):
    """The decision on one command record, as its owning replica took it."""

    model_config = ConfigDict(frozen=True, extra="forbid", regex_engine="python-re")

    schema_version: Literal[1] = 1
    partition: int  # the command's partition and offset
    offset: int
    command: HeldAction | AgencyAction
    agency_id: _Identifier
    building_id: _Identifier | None = None
    outcome: Literal["carried_out"] | Refusal
    summary: _Text  # a few words: "approved", "nothing to retry", "refused"
    detail: _Text = ""  # why, and what to do, when there is more to say
    documents: int | None = None  # documents the command's plan acted on
    uploads: int | None = None  # uploads it started
    retried: int | None = None  # retry: documents sent again
    still_parked: dict[str, int] = {}  # retry: what stays parked, by reason
    plan: str | None = None  # approve: the fingerprint approved
    requested_by: str = "unknown"
    requested_at: dt.datetime
    decided_at: dt.datetime

    @property
    def carried_out(self) -> bool:
        return self.outcome == CARRIED_OUT

    @property
    def sentence(self) -> str:
        return f"{self.summary}: {self.detail}" if self.detail else self.summary


def encode_outcome(outcome: CommandOutcome) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The value and headers of ``outcome``'s record."""
    value = outcome.model_dump_json(exclude_none=True).encode()
    return value, [(RECORD_HEADER, OUTCOME_MARK)]


def decode_outcome(value: bytes | None) -> CommandOutcome | None:
    """The outcome a marked record carries, or None if it carries none that can be read."""
    if value is None:
        return None
    try:
        return CommandOutcome.model_validate_json(value)
    except ValidationError:
        return None


def refusal_outcome(
    command: OperatorCommand, refusal: Refusal, *, partition: int, offset: int, at: dt.datetime
) -> CommandOutcome:
    """The outcome of a command the owning replica refused."""
    return CommandOutcome(
        partition=partition,
        offset=offset,
        command=command.command,
        agency_id=command.agency_id,
        building_id=command.building_id,
        outcome=refusal,
        summary="refused",
        detail=_REFUSED[refusal],
        plan=command.plan,
        requested_by=command.requested_by,
        requested_at=command.requested_at,
        decided_at=at,
    )


def carried_out_outcome(
    command: OperatorCommand,
    *,
    partition: int,
    offset: int,
    at: dt.datetime,
    documents: int,
    uploads: int,
    still_parked: Mapping[str, int] | None = None,
    unmapped: Iterable[str] = (),
) -> CommandOutcome:
    """The outcome of a command carried out: ``documents`` and ``uploads`` its plan started,
    and for a retry what stays parked by reason (``unmapped``: the buildings without mapping)."""
    action = command.command
    summary, detail = _ACTED.get(action, action.value), ""
    retried: int | None = None
    parked = dict(still_parked or {})
    if action is AgencyAction.PAUSE and command.backfill_only:
        summary = "first publication paused"
    elif action is AgencyAction.APPROVE:
        detail = f"{_counted(uploads, 'upload')} started"
    elif action in (HeldAction.RELEASE, HeldAction.DISCARD):
        detail = f"{_counted(documents, 'document')} decided"
    elif action is AgencyAction.REPAIR:
        detail = f"{_counted(documents, 'document')} to fix on the partner"
    elif action is AgencyAction.RETRY:
        retried = documents
        summary, detail = _retry_words(documents, parked, sorted(set(unmapped)))
    return CommandOutcome(
        partition=partition,
        offset=offset,
        command=action,
        agency_id=command.agency_id,
        building_id=command.building_id,
        outcome=CARRIED_OUT,
        summary=summary,
        detail=detail,
        documents=documents,
        uploads=uploads,
        retried=retried,
        still_parked=parked if action is AgencyAction.RETRY else {},
        plan=command.plan,
        requested_by=command.requested_by,
        requested_at=command.requested_at,
        decided_at=at,
    )


_ACTED: dict[HeldAction | AgencyAction, str] = {
    AgencyAction.PAUSE: "paused",
    AgencyAction.RESUME: "resumed",
    AgencyAction.APPROVE: "approved",
    AgencyAction.REPAIR: "repair started",
    HeldAction.RELEASE: "released",
    HeldAction.DISCARD: "discarded",
}


def _retry_words(retried: int, parked: Mapping[str, int], unmapped: list[str]) -> tuple[str, str]:
    """Summary and detail of a retry: what is sent again, and what stays parked and why."""
    stays = []
    for reason, count in sorted(parked.items()):
        if reason == "unmapped_building" and unmapped:
            names = ", ".join(unmapped[:5]) + (" and others" if len(unmapped) > 5 else "")
            verb = "is" if len(unmapped) == 1 else "are"
            stays.append(f"{names} {verb} unmapped; {_STAYS_PARKED[reason]}")
        else:
            fix = _STAYS_PARKED.get(reason)
            stays.append(f"{count} stay parked ({reason})" + (f"; {fix}" if fix else ""))
    if retried == 0:
        return ("nothing to retry", "; ".join(stays)) if stays else ("nothing parked", "")
    sent = f"{_counted(retried, 'document')} sent again"
    return "retried", "; ".join([sent, *stays])


def _counted(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def partition_ranges(partitions: Iterable[int]) -> str:
    """``partitions 0-3, 5`` or ``partition 2``: consecutive partitions as ranges."""
    numbers = sorted(set(partitions))
    spans: list[list[int]] = []
    for number in numbers:
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"partition{'s' if len(numbers) != 1 else ''} {text}"


def grouped(outcomes: Iterable[CommandOutcome]) -> list[tuple[CommandOutcome, list[int]]]:
    """Outcomes saying the same thing, with the partitions that said it, in partition order."""
    groups: dict[tuple[str, str, str], tuple[CommandOutcome, list[int]]] = {}
    for outcome in sorted(outcomes, key=lambda o: o.partition):
        key = (str(outcome.outcome), outcome.summary, outcome.detail)
        groups.setdefault(key, (outcome, []))[1].append(outcome.partition)
    return list(groups.values())


def describe(outcome: CommandOutcome, partitions: Iterable[int]) -> str:
    """One line for people: "approved on partitions 0-5: 12 uploads started"."""
    where = f"{outcome.summary} on {partition_ranges(partitions)}"
    return f"{where}: {outcome.detail}" if outcome.detail else where
