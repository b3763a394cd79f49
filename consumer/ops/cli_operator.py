"""The operator's subcommands of ``chouette-relay``: list what waits for an operator, and act on it.

``held``/``release``/``discard`` (manifests held by the mass-deletion guard), ``pause``/``resume``
(stop and restart everything sent for one agency), ``approve`` (start a first publication whose
plan an operator has read), ``parked``/``retry`` (documents waiting for a configuration fix) and
``dead-letters``/``replay``. Each runs ``consumer.ops.admin.Operator``, the same implementation as
the admin HTTP endpoints. Those that list something print a readable form on a terminal and
JSON with ``--json`` or when piped. A command waits (bounded) for the outcome each owning replica
writes back and says it in words; ``history`` lists every operator action with its outcomes.
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
from consumer.core.outcomes import CommandOutcome, describe, grouped, partition_ranges
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
        "--repair",
        action="store_true",
        help="queue the fixes for the owning replicas, and wait for their outcomes",
    )
    audit.add_argument(
        "--replica",
        metavar="URL",
        help="run the audit on this replica's ops server (token: HTTP__ADMIN_TOKEN_FILE): its "
        "requests then share the agency's rate limiter and it sets the findings metric",
    )
    for name in ("release", "discard", "pause", "resume", "approve", "retry"):
        _add_wait_options(commands.choices[name])
    history = commands.add_parser(
        "history",
        help="every operator action, who asked and what came of it (as far back as the "
        "commands topic keeps)",
    )
    history.add_argument("--agency", help="only this agency")
    history.add_argument("--limit", type=_positive, metavar="N", help="only the N newest actions")
    history.add_argument("--json", action="store_true", help="the list as JSON (also when piped)")
    audit_waits = audit.add_argument_group("with --repair")
    audit_waits.add_argument(
        "--wait-s",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the repairs' outcomes (default 30)",
    )
    audit_waits.add_argument(
        "--no-wait", action="store_true", help="return once the repairs are written"
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


def _positive(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a number of actions (1 or more)")
    return number


NO_ANSWER = 4
"""Exit code of a command whose owning replicas did not all answer within ``--wait-s``."""


def _add_wait_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--wait-s",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the replicas' outcomes (default 30)",
    )
    command.add_argument(
        "--no-wait",
        action="store_true",
        help="return once the command is written, without waiting for its outcome",
    )
    command.add_argument(
        "--json", action="store_true", help="the outcomes as JSON (also when piped)"
    )


async def run_operator_command(settings: Settings, args: argparse.Namespace) -> int:
    """Run one operator subcommand and print its result; 1 if a replay or a command was
    refused, ``NO_ANSWER`` if a command's replicas did not all answer in time.

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
        elif command in _WAITING:
            result = await _queue(operator, args, requested_by=who)
        elif command == "audit":
            result = await _audit(operator, args, requested_by=who)
        elif command == "parked":
            result = {"parked": await operator.parked(args.agency)}
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
        elif command == "history":
            result = await _history(operator, args)
        else:
            raise ValueError(f"unknown command {command}")
        if command in _LISTS and not next(iter(result.values())):
            _known(operator, getattr(args, "agency", None))
        if command in _WAITING and not args.no_wait:
            code = await _await_outcomes(operator, args, result)
        elif command == "audit" and args.repair and "repairs" in result and not args.no_wait:
            code = await _await_repairs(operator, args, result)
    _print(command, args, result)
    return code


async def _queue(operator: Operator, args: argparse.Namespace, *, requested_by: str) -> Any:
    """Write the command; where it was written."""
    command = args.command
    if command in ("release", "discard"):
        return await operator.queue(
            HeldAction(command), args.agency, args.building, requested_by=requested_by
        )
    if command == "approve":
        return await operator.approve(args.agency, args.plan, requested_by=requested_by)
    return await operator.queue(
        AgencyAction(command),
        args.agency,
        getattr(args, "building", None),
        requested_by=requested_by,
        backfill_only=getattr(args, "backfill_only", False),
    )


# Listings by agency: an agency since removed from the routing file keeps what it left; an empty
# list for a name the routing file does not know is more likely a typo, said as one.
_LISTS = frozenset({"held", "parked", "dead-letters", "history"})


def _known(operator: Operator, agency: str | None) -> None:
    if agency is not None:
        operator.check_target(agency)


async def _history(operator: Operator, args: argparse.Namespace) -> dict[str, Any]:
    actions = await operator.history(args.agency)
    return {"history": actions[-args.limit :] if args.limit else actions}


# The commands that wait for the outcomes of the replicas that carry them out.
_WAITING = frozenset({"release", "discard", "pause", "resume", "approve", "retry"})


async def _await_repairs(operator: Operator, args: argparse.Namespace, result: Any) -> int:
    """Wait for the outcomes of an audit's repair commands, within one ``--wait-s`` for all."""
    deadline = time.monotonic() + args.wait_s
    codes = [
        await _await_outcomes(
            operator, args, queued, timeout_s=max(0.0, deadline - time.monotonic())
        )
        for queued in result["repairs"]
    ]
    if 1 in codes:
        return 1
    return NO_ANSWER if NO_ANSWER in codes else 0


async def _await_outcomes(
    operator: Operator, args: argparse.Namespace, result: Any, *, timeout_s: float | None = None
) -> int:
    """Wait for the outcome of every partition the command was written to; add them to
    ``result`` and say on stderr what went wrong (a refusal, partitions that did not answer)."""
    written = [(p["partition"], p["offset"]) for p in result["partitions"]]
    found = await operator.outcomes(
        written, timeout_s=args.wait_s if timeout_s is None else timeout_s
    )
    result["outcomes"] = [found[place].model_dump(mode="json") for place in sorted(found)]
    missing = sorted(p for p, o in written if (p, o) not in found)
    result["unanswered"] = missing
    refused = [o for o in found.values() if not o.carried_out]
    problems = [
        f"{result['queued']} {_target(result)}: {describe(outcome, partitions)}"
        for outcome, partitions in grouped(refused)
    ]
    if missing:
        problems.append(_no_answer(missing, args.wait_s))
    result["said"] = _said(list(found.values()), missing, args.wait_s)
    if problems and (args.json or not sys.stdout.isatty()):
        sys.stderr.write("\n".join(problems) + "\n")
    if refused:
        return 1
    return NO_ANSWER if missing else 0


def _target(result: dict[str, Any]) -> str:
    return " ".join(result[k] for k in ("agency", "building") if k in result)


def _no_answer(missing: list[int], wait_s: float) -> str:
    return (
        f"no answer from {partition_ranges(missing)} within {wait_s:g} s: is a replica running? "
        "`chouette-relay status`"
    )


def _said(outcomes: list[CommandOutcome], missing: list[int], wait_s: float) -> list[str]:
    """One line per distinct outcome, with the partitions that gave it."""
    lines = [describe(outcome, partitions) for outcome, partitions in grouped(outcomes)]
    if missing:
        lines.append(_no_answer(missing, wait_s))
    return lines


def _render_command(result: dict[str, Any]) -> str:
    """What a command did, in words: where it was written, and each distinct outcome."""
    written = partition_ranges(p["partition"] for p in result["partitions"])
    head = f"{result['queued']} {_target(result)}: written to {written}"
    if "said" not in result:
        return f"{head}; not waiting for the outcome (chouette-relay history shows it later)"
    return "\n".join([head, *result["said"]])


def _render_history(result: dict[str, Any]) -> str:
    """One line per operator action (newest last), a line more per further outcome."""
    actions: list[dict[str, Any]] = result["history"]
    if not actions:
        return "No operator actions in the commands topic."
    lines = [f"{'requested at (UTC)':<20} {'by':<28} {'command':<16} {'target':<28} outcome"]
    for action in actions:
        when = action["requested_at"][:19].replace("T", " ")
        target = " ".join(filter(None, (action["agency"], action.get("building"))))
        said = action["said"] or ["(no outcome)"]
        command = action["command"] + (" (backfill)" if action.get("scope") == "backfill" else "")
        lines.append(
            f"{when:<20} {action['requested_by'][:28]:<28} {command:<16} {target:<28} {said[0]}"
        )
        indent = " " * (20 + 28 + 16 + 28 + 4)
        lines += [f"{indent}{line}" for line in said[1:]]
        if action.get("plan"):
            lines.append(f"{indent}plan {action['plan']}")
    return "\n".join(lines)


def render_readable(command: str, result: Any) -> str:
    """``command``'s result in its readable form (for a command that has one)."""
    return _READABLE[command](result)


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
    "audit": render_audit,
    "dead-letters": _render_dead_letters,
    "held": _render_held,
    "parked": _render_parked,
    "history": _render_history,
    **dict.fromkeys(_WAITING, _render_command),
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
