"""Operator commands: what a command on one building or on a whole agency looks like on the wire."""

from __future__ import annotations

import datetime as dt

import orjson
import pytest

from consumer.core.commands import AgencyAction, HeldAction, OperatorCommand, decode_command
from consumer.core.controls import plan_agency_command
from consumer.core.decoding import Poison, PoisonReason
from consumer.core.routing import RoutingTable
from consumer.core.view import PublishedView

NOW = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
ROUTING = RoutingTable.from_mapping(
    {"agencies": {"agence-a": {"modules": ["ag"], "first_publication": "fresh"}}}
)


def _wire(command: OperatorCommand) -> bytes:
    return orjson.dumps(command.model_dump(mode="json", exclude_none=True))


def test_an_agency_command_is_keyed_by_the_agency_and_a_building_command_by_the_building() -> None:
    pause = OperatorCommand(command=AgencyAction.PAUSE, agency_id="agence-a", requested_at=NOW)
    retry = OperatorCommand(
        command=AgencyAction.RETRY, agency_id="agence-a", building_id="bat-1", requested_at=NOW
    )

    assert pause.key == b"agence-a"
    assert retry.key == b"agence-a:bat-1"
    assert decode_command(pause.key, _wire(pause)) == pause
    assert decode_command(retry.key, _wire(retry)) == retry
    mismatch = decode_command(b"agence-b", _wire(pause))
    assert isinstance(mismatch, Poison)
    assert mismatch.reason is PoisonReason.KEY_MISMATCH


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"command": "release"}, "building_id is required"),
        ({"command": "pause", "building_id": "bat-1"}, "no building_id"),
        ({"command": "approve"}, "plan fingerprint"),
        ({"command": "resume", "plan": "ab" * 16}, "plan fingerprint"),
        ({"command": "explode"}, "command"),
    ],
)
def test_a_command_out_of_its_scope_is_poison(fields: dict[str, str], problem: str) -> None:
    value = orjson.dumps(
        {"agency_id": "agence-a", "requested_at": NOW.isoformat(), "schema_version": 1, **fields}
    )
    decoded = decode_command(b"agence-a", value)

    assert isinstance(decoded, Poison)
    assert decoded.reason is PoisonReason.SCHEMA_VIOLATION
    assert problem in decoded.detail


def test_held_actions_still_name_their_building() -> None:
    release = OperatorCommand(
        command=HeldAction.RELEASE, agency_id="agence-a", building_id="bat-1", requested_at=NOW
    )
    assert decode_command(b"agence-a:bat-1", _wire(release)) == release


def test_backfill_only_goes_with_pause_alone() -> None:
    pause = OperatorCommand(
        command=AgencyAction.PAUSE, agency_id="agence-a", backfill_only=True, requested_at=NOW
    )
    assert decode_command(pause.key, _wire(pause)) == pause
    value = orjson.dumps(
        {"command": "resume", "agency_id": "agence-a", "backfill_only": True, "requested_at": NOW}
    )
    refused = decode_command(b"agence-a", value)
    assert isinstance(refused, Poison)
    assert "backfill_only goes with pause only" in refused.detail


def _control(view: PublishedView, action: AgencyAction, *, backfill_only: bool = False) -> None:
    command = OperatorCommand(
        command=action, agency_id="agence-a", backfill_only=backfill_only, requested_at=NOW
    )
    for record in plan_agency_command(view, ROUTING, command).records:
        view.apply(record)


def test_a_pause_sets_its_scope_and_resume_ends_either() -> None:
    view = PublishedView()
    _control(view, AgencyAction.PAUSE, backfill_only=True)
    assert (view.paused_agencies(), view.backfill_paused_agencies()) == (set(), {"agence-a"})

    _control(view, AgencyAction.PAUSE)  # widened to live and backfill together
    assert (view.paused_agencies(), view.backfill_paused_agencies()) == ({"agence-a"}, set())

    _control(view, AgencyAction.PAUSE, backfill_only=True)  # narrowed: live documents go again
    assert (view.paused_agencies(), view.backfill_paused_agencies()) == (set(), {"agence-a"})

    _control(view, AgencyAction.RESUME)
    assert (view.paused_agencies(), view.backfill_paused_agencies()) == (set(), set())
