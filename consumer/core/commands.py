"""Operator commands, carried by a Kafka topic to the replicas that own what they act on.

Held withdrawals and parked documents live in the view of the partition that owns the building,
and only the replica that owns that partition can act on them. So an operator command is a record
on the commands topic. A command on one building (release or discard its held withdrawals, retry
its parked documents) is keyed like the input topics so it lands on the same partition number, in
order with the building's events. A command on a whole agency (pause, resume, retry, approve) is
keyed by the agency alone and written to every partition: an agency spans them all, and each
owning replica learns it from its own partitions. Any replica, or the CLI, can send one. This
module is the command itself and its decoding; sending it is the Kafka edge's part
(``consumer/kafka/commands.py``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError, model_validator

from consumer.core.decoding import Poison, PoisonReason
from consumer.core.patterns import IDENTIFIER_PATTERN


class HeldAction(StrEnum):
    RELEASE = "release"  # carry out the held withdrawals
    DISCARD = "discard"  # forget them: the documents stay published


class AgencyAction(StrEnum):
    PAUSE = "pause"  # send nothing of the agency; its work waits, offsets uncommitted
    RESUME = "resume"  # send what waited
    RETRY = "retry"  # send parked documents again (one building, or the whole agency)
    APPROVE = "approve"  # start the first-publication backfill whose plan has this fingerprint
    REPAIR = "repair"  # settle what an audit found on the partner (one building)


class Refusal(StrEnum):
    """Why the replica that owns a command's target refused to carry it out (a closed set: these
    are metric label values)."""

    UNKNOWN_AGENCY = "unknown_agency"  # not in the replica's routing file
    UNKNOWN_BUILDING = "unknown_building"  # not mapped to a condominium in the routing file
    UNSIGNED = "unsigned"  # the replica holds a command key; the record carries no MAC
    BAD_SIGNATURE = "bad_signature"  # its MAC was not made with the replica's command key
    PLAN_CHANGED = "plan_changed"  # an approve whose share differs from the plan computed now
    PLAN_UNCHECKED = "plan_unchecked"  # an approve without its shares (an older CLI): unverifiable


class FindingKind(StrEnum):
    MISSING = "missing"  # the view says published; the partner does not hold it
    UNEXPECTED = "unexpected"  # the partner holds it with our reference; the view does not know it
    CHANGED = "changed"  # both know it, with different content (sha256)


class Finding(BaseModel):
    """One difference between the partner and the relay's view, found by an audit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: FindingKind
    document_id: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    remote_id: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    view_sha256: str | None = None
    partner_sha256: str | None = None


_Identifier = Annotated[str, StringConstraints(pattern=IDENTIFIER_PATTERN)]
_Share = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]


class OperatorCommand(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", regex_engine="python-re")

    schema_version: Literal[1] = 1
    command: HeldAction | AgencyAction
    agency_id: _Identifier
    building_id: _Identifier | None = None  # None: the whole agency, on every partition
    plan: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16,64}$")] | None = None
    # approve only: the share of every input partition in ``plan``, in partition order; each
    # owning replica checks its own against the plan it computes when the approval arrives
    plan_shares: tuple[_Share, ...] = ()
    findings: tuple[Finding, ...] = ()  # repair only
    backfill_only: bool = False  # pause only: the first publication waits, live documents go on
    requested_at: dt.datetime
    requested_by: Annotated[str, StringConstraints(max_length=200)] = "unknown"

    @model_validator(mode="after")
    def _scoped(self) -> OperatorCommand:
        needs_building = isinstance(self.command, HeldAction) or self.command is AgencyAction.REPAIR
        if needs_building and self.building_id is None:
            raise ValueError(f"{self.command} acts on one building: building_id is required")
        if self.command in (AgencyAction.PAUSE, AgencyAction.RESUME, AgencyAction.APPROVE) and (
            self.building_id is not None
        ):
            raise ValueError(f"{self.command} acts on a whole agency: no building_id")
        if (self.command is AgencyAction.APPROVE) != (self.plan is not None):
            raise ValueError("a plan fingerprint goes with approve, and only with it")
        if self.plan_shares and self.command is not AgencyAction.APPROVE:
            raise ValueError("plan shares go with approve only")
        if len(self.plan_shares) > 4096:
            raise ValueError("more plan shares than a topic has partitions")
        if self.backfill_only and self.command is not AgencyAction.PAUSE:
            raise ValueError("backfill_only goes with pause only")
        if self.findings and self.command is not AgencyAction.REPAIR:
            raise ValueError("findings go with repair only")
        return self

    @property
    def key(self) -> bytes:
        if self.building_id is None:
            return self.agency_id.encode()
        return f"{self.agency_id}:{self.building_id}".encode()


def decode_command(key: bytes | None, value: bytes | None) -> OperatorCommand | Poison:
    """A command, or the reason it cannot be one (dead-lettered like any poison input)."""
    if value is None:
        return Poison(PoisonReason.NULL_VALUE, "a command needs a value")
    try:
        command = OperatorCommand.model_validate_json(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "value"
        return Poison(PoisonReason.SCHEMA_VIOLATION, f"{where}: {first['msg']}")
    if key != command.key:
        return Poison(PoisonReason.KEY_MISMATCH, f"key {key!r} is not {command.key!r}")
    return command


MAC_HEADER = "chouette-relay-mac"
"""The Kafka header carrying a command record's MAC (hex HMAC-SHA256 of its key and value)."""


def command_mac(secret: bytes, key: bytes, value: bytes) -> bytes:
    """The MAC of a command record: HMAC-SHA256 over its Kafka key and value, length-prefixed so
    that no split of the same bytes between key and value gives the same MAC."""
    signed = hmac.new(secret, len(key).to_bytes(4, "big") + key, hashlib.sha256)
    signed.update(value)
    return signed.hexdigest().encode()


def mac_refusal(
    secret: bytes | None, key: bytes | None, value: bytes, headers: Iterable[tuple[str, bytes]]
) -> Refusal | None:
    """Why a command record is not trusted, or None: with a ``secret``, the record must carry
    exactly one MAC header made with it. Without one, every record is taken as before."""
    if secret is None:
        return None
    given = [mac for name, mac in headers if name == MAC_HEADER]
    if not given:
        return Refusal.UNSIGNED
    expected = command_mac(secret, key or b"", value)
    if len(given) != 1 or not hmac.compare_digest(given[0] or b"", expected):
        return Refusal.BAD_SIGNATURE
    return None
