"""Operator commands on held deletions, carried by a Kafka topic to the replica that owns them.

The mass-deletion guard holds withdrawals in the view of the partition that owns the building, and
only the replica that owns that partition can act on them. So an operator command (release or
discard the held withdrawals of one building) is a record on the commands topic, keyed like the
input topics so it lands on the same partition number: whichever replica owns the building reads
it in order with the building's events. Any replica, or the CLI, can send one. This module is the
command itself and its decoding; sending it is the Kafka edge's part (``send_command``).
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from consumer.core.decoding import Poison, PoisonReason
from consumer.core.events import IDENTIFIER_PATTERN


class HeldAction(StrEnum):
    RELEASE = "release"  # carry out the held withdrawals
    DISCARD = "discard"  # forget them: the documents stay published


class OperatorCommand(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", regex_engine="python-re")

    schema_version: Literal[1] = 1
    command: HeldAction
    agency_id: Annotated[str, StringConstraints(pattern=IDENTIFIER_PATTERN)]
    building_id: Annotated[str, StringConstraints(pattern=IDENTIFIER_PATTERN)]
    requested_at: dt.datetime
    requested_by: Annotated[str, StringConstraints(max_length=200)] = "unknown"

    @property
    def key(self) -> bytes:
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
