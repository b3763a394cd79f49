"""The operator's subcommands of ``chouette-relay``: list what waits for an operator, and act on it.

``held``/``release``/``discard`` (manifests held by the mass-deletion guard), ``pause``/``resume``
(stop and restart everything sent for one agency), ``approve`` (start a first publication whose
plan an operator has read), ``parked``/``retry`` (documents waiting for a configuration fix) and
``dead-letters``/``replay``. Each runs ``consumer.ops.admin.Operator``, the same implementation as
the admin HTTP endpoints. Those that list or queue something print a readable form on a
terminal and JSON with ``--json`` or when piped.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson

from consumer.core.commands import AgencyAction, HeldAction
from consumer.errors import PartnerError
from consumer.ops.admin import Operator
from consumer.ops.audit import render_audit, run_audit
from consumer.ops.overview import add_replica_status, gather, render
from consumer.ops.replica import replica_audit, replica_status
from consumer.settings import Settings


def add_operator_commands(commands: Any) -> None:
    """Register the operator's subcommands on ``commands`` (argparse sub-parsers)."""
    held = commands.add_parser(
        "held", help="list what waits for a decision on a held manifest (withdrawals, uploads)"
    )
    held.add_argument("--agency", help="only this agency")
    held.add_argument("--json", action="store_true", help="the list as JSON (also when piped)")
    for name, text in (
        ("release", "apply the held manifest of a building, as if applied when it arrived"),
        (
            "discard",
            "drop the held manifest of a building (published documents stay, waiting "
            "ones are sent)",
        ),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("agency")
        command.add_argument("building")
    pause = commands.add_parser(
        "pause", help="send nothing more for an agency (its work waits; survives restarts)"
    )
    pause.add_argument("agency")
    pause.add_argument(
        "--backfill-only",
        action="store_true",
        help="pause only its first publication; its live documents keep flowing",
    )
    commands.add_parser(
        "resume", help="send what waited for a paused agency (either pause)"
    ).add_argument("agency")
    approve = commands.add_parser(
        "approve", help="start an agency's first publication, as the plan showed it"
    )
    approve.add_argument("agency")
    approve.add_argument("--plan", required=True, help="the fingerprint the plan printed")
    approve.add_argument(
        "--json", action="store_true", help="what was queued, as JSON (also when piped)"
    )
    parked = commands.add_parser("parked", help="list parked documents and why they wait")
    parked.add_argument("--json", action="store_true", help="the list as JSON (also when piped)")
    parked.add_argument("--agency", help="only this agency")
    retry = commands.add_parser("retry", help="send parked documents again after a fix")
    retry.add_argument("agency")
    retry.add_argument("building", nargs="?", help="only this building")
    status = commands.add_parser("status", help="every agency across the cluster, readable")
    status.add_argument("--agency", help="only this agency")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--watch", type=float, metavar="SECONDS", help="refresh every SECONDS (Ctrl-C stops)"
    )
    status.add_argument(
        "--replica",
        action="append",
        default=[],
        metavar="URL",
        help="also ask this replica's ops server (breakers, approvals awaited); repeatable",
    )
    audit = commands.add_parser(
        "audit", help="compare what ChouetteCopro holds with the relay's view; --repair fixes"
    )
    audit.add_argument("--agency", required=True)
    audit.add_argument("--building", help="only this building")
    audit.add_argument(
        "--json", action="store_true", help="the whole report as JSON (also when piped)"
    )
    audit.add_argument(
        "--repair", action="store_true", help="queue the fixes for the owning replicas"
    )
    audit.add_argument(
        "--replica",
        metavar="URL",
        help="run the audit on this replica's ops server (token: HTTP__ADMIN_TOKEN_FILE): its "
        "requests then share the agency's rate limiter and it sets the findings metric",
    )
    letters = commands.add_parser("dead-letters", help="list the dead-letter topic")
    letters.add_argument("--reason", help="only this reason")
    letters.add_argument("--source-topic", help="only records from this topic")
    letters.add_argument("--agency", help="only records keyed to this agency")
    letters.add_argument("--json", action="store_true", help="the list as JSON (also when piped)")
    replay = commands.add_parser(
        "replay", help="re-publish dead letters to their source topic, once each"
    )
    replay.add_argument("ids", nargs="*", metavar="ID", help="topic/partition/offset, as listed")
    replay.add_argument("--reason", help="every dead letter of this reason")
    replay.add_argument("--force", action="store_true", help="replay even if replayed before")


async def run_operator_command(settings: Settings, args: argparse.Namespace) -> int:
    """Run one operator subcommand and print its result; 1 if a replay was refused.

    An agency or building the routing file does not know raises ``UnknownTargetError`` (a
    ``ValueError``: the command line exits 2 with the closest known names), before anything is
    written.
    """
    who = f"cli:{getpass.getuser()}@{socket.gethostname()}"
    code = 0
    async with Operator(settings) as operator:
        command = args.command
        result: Any
        if command == "status":
            return await _status(operator, args)
        if command == "held":
            held = await operator.held()
            result = {"held": [h for h in held if args.agency in (None, h["agency"])]}
        elif command in ("release", "discard"):
            result = await operator.queue(
                HeldAction(command), args.agency, args.building, requested_by=who
            )
        elif command in ("pause", "resume"):
            result = await operator.queue(
                AgencyAction(command),
                args.agency,
                requested_by=who,
                backfill_only=getattr(args, "backfill_only", False),
            )
        elif command == "approve":
            result = await operator.approve(args.agency, args.plan, requested_by=who)
        elif command == "audit":
            result = await _audit(operator, args, requested_by=who)
        elif command == "parked":
            result = {"parked": await operator.parked(args.agency)}
        elif command == "retry":
            result = await operator.queue(
                AgencyAction.RETRY, args.agency, args.building, requested_by=who
            )
        elif command == "dead-letters":
            letters = await operator.dead_letters(
                reason=args.reason, source_topic=args.source_topic
            )
            # The input topics are keyed "agency:building"; a record without a key has no agency.
            result = {
                "dead_letters": [
                    letter
                    for letter in letters
                    if args.agency in (None, (letter["key"] or "").split(":", 1)[0])
                ]
            }
        elif command == "replay":
            replayed = await operator.replay(args.ids, reason=args.reason, force=args.force)
            result = {"replayed": replayed}
            code = 1 if any(r["outcome"] != "replayed" for r in replayed) else 0
        else:
            raise ValueError(f"unknown command {command}")
    _print(command, args, result)
    return code


def _print(command: str, args: argparse.Namespace, result: Any) -> None:
    """The readable form on a terminal, for a command that has one; with --json, or piped: JSON."""
    readable = _READABLE.get(command)
    if readable is not None and not args.json and sys.stdout.isatty():
        sys.stdout.write(readable(result) + "\n")
    else:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")


def _render_parked(result: dict[str, Any]) -> str:
    """One line per parked document, by building, with the reason it waits."""
    parked: list[dict[str, Any]] = result["parked"]
    if not parked:
        return "No parked documents."
    lines = [
        f"{'agency':<20} {'building':<14} {'module':<18} {'operation':<9} {'document':<24} reason"
    ]
    lines += [
        f"{p['agency']:<20} {p['building']:<14} {p['module']:<18} {p['operation']:<9} "
        f"{p['document']:<24} {p['reason']}"
        for p in parked
    ]
    lines.append(
        f"\n{len(parked)} parked; send them again after a fix: chouette-relay retry AGENCY"
    )
    return "\n".join(lines)


def _render_held(result: dict[str, Any]) -> str:
    """Per building, what its held manifest keeps waiting and the two answers an operator has."""
    held: list[dict[str, Any]] = result["held"]
    if not held:
        return "No held manifests: nothing waits for a decision."
    blocks = []
    for entry in held:
        agency, building = entry["agency"], entry["building"]
        withdrawals, uploads = entry["withdrawals"], entry["uploads"]
        since = _moment(entry.get("since"))
        blocks.append(
            f"{agency} {building}: manifest {entry['snapshot_id']} held since {since}\n"
            f"  waits     {entry['documents']} documents: {withdrawals} withdrawals, "
            f"{uploads} uploads\n"
            f"  release   chouette-relay release {agency} {building}   (apply it: withdraw "
            f"{withdrawals}, keep {uploads} unpublished)\n"
            f"  discard   chouette-relay discard {agency} {building}   (drop it: keep the "
            f"{withdrawals} published, send the {uploads})"
        )
    withdrawals = sum(entry["withdrawals"] for entry in held)
    uploads = sum(entry["uploads"] for entry in held)
    blocks.append(
        f"held manifests: {len(held)}; {withdrawals} withdrawals and {uploads} uploads wait"
    )
    return "\n\n".join(blocks)


def _render_dead_letters(result: dict[str, Any], *, detail_width: int = 60) -> str:
    """One line per dead letter (when, where from, why, replayed or not), then a count by
    reason."""
    letters: list[dict[str, Any]] = result["dead_letters"]
    if not letters:
        return "No dead letters."
    lines = [
        f"{'failed at':<20} {'id (topic/partition/offset)':<40} {'reason':<22} "
        f"{'replayed':<20} detail"
    ]
    for letter in letters:
        replayed = _moment(letter["replayed_at"]) if letter["replayed"] else "no"
        detail = " ".join(str(letter["detail"]).split())
        if len(detail) > detail_width:
            detail = detail[: detail_width - 3] + "..."
        lines.append(
            f"{_moment(letter['failed_at']):<20} {letter['id']:<40} {letter['reason']:<22} "
            f"{replayed:<20} {detail}"
        )
    reasons = Counter(letter["reason"] for letter in letters)
    summary = ", ".join(f"{reason} {count}" for reason, count in reasons.most_common())
    waiting = sum(not letter["replayed"] for letter in letters)
    lines.append(
        f"\ndead letters: {len(letters)} ({summary}), {waiting} not replayed; once the cause "
        "is fixed: chouette-relay replay ID... or --reason REASON"
    )
    return "\n".join(lines)


def _render_approve(result: dict[str, Any]) -> str:
    """What the approve queued, in words."""
    agency = result["agency"]
    partitions = len(result["partitions"])
    return (
        f"Queued: the first publication of {agency} starts as plan {result['plan']} showed it. "
        f"The replicas owning its {partitions} partitions each check their share of the plan "
        f"again and refuse it if it changed; follow it with chouette-relay status --agency {agency}"
    )


def _moment(text: str | None) -> str:
    """An ISO time as a person reads it, in UTC to the second."""
    if not text:
        return "unknown"
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        return text
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC)
    return f"{moment:%Y-%m-%d %H:%M:%S}"


# The commands with a readable form on a terminal, and how each is shown.
_READABLE: dict[str, Callable[[Any], str]] = {
    "approve": _render_approve,
    "audit": render_audit,
    "dead-letters": _render_dead_letters,
    "held": _render_held,
    "parked": _render_parked,
}


async def _status(operator: Operator, args: argparse.Namespace) -> int:
    """Print the cluster's view per agency, once or every ``--watch`` seconds."""
    previous, sampled_at = None, 0.0
    if args.agency is not None:
        operator.check_target(args.agency)
    while True:
        # The replicas first: a wrong URL or token is said before the slower read of Kafka.
        replicas = [await replica_status(operator.settings, url) for url in args.replica]
        found = await gather(operator, agency=args.agency)
        # The rate is measured over the time between samples, gathering included (seconds on a
        # large cluster), not over the --watch pause alone.
        now = time.monotonic()
        elapsed, sampled_at = now - sampled_at, now
        for status in replicas:
            add_replica_status(found, status)
        if args.json:
            payload = {name: entry.plain() for name, entry in found.items()}
            text = orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode()
        else:
            text = render(found, previous, elapsed)
        if args.watch:
            sys.stdout.write("\x1b[2J\x1b[H")  # clear the terminal between refreshes
            if not args.json:
                moment = dt.datetime.now().astimezone()
                text = f"as of {moment:%H:%M:%S}, every {args.watch:g} s (Ctrl-C stops)\n\n{text}"
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        if not args.watch:
            return 0
        previous = found
        await asyncio.sleep(args.watch)


_LOCAL_AUDIT_NOTE = (
    "audited from here, paced by its share of the agency's rate alone: the replicas' limiters "
    "do not see these requests and chouette_relay_audit_findings is not set (both only when a "
    "replica runs the audit: add --replica URL)\n"
)


async def _audit(operator: Operator, args: argparse.Namespace, *, requested_by: str) -> Any:
    """The audit, run here or (``--replica``) by a replica."""
    if args.replica:
        return await replica_audit(
            operator.settings,
            args.replica,
            agency=args.agency,
            building=args.building,
            repair=args.repair,
        )
    operator.check_target(args.agency, args.building)
    try:
        result = await run_audit(
            operator,
            args.agency,
            building_id=args.building,
            repair=args.repair,
            requested_by=requested_by,
        )
    except PartnerError as exc:
        raise ValueError(f"the audit stopped, nothing was repaired: {exc}") from None
    sys.stderr.write(_LOCAL_AUDIT_NOTE)
    return result
