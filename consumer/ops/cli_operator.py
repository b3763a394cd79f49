"""The operator's subcommands of ``chouette-relay``: list what waits for an operator, and act on it.

``held``/``release``/``discard`` (manifests held by the mass-deletion guard), ``pause``/``resume``
(stop and restart everything sent for one agency), ``approve`` (start a first publication whose
plan an operator has read), ``parked``/``retry`` (documents waiting for a configuration fix) and
``dead-letters``/``replay``. Each runs ``consumer.ops.admin.Operator``, the same implementation as
the admin HTTP endpoints, and prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import socket
import sys
import time
from typing import Any

import aiohttp
import orjson

from consumer.core.commands import AgencyAction, HeldAction
from consumer.errors import ConfigError, PartnerError
from consumer.ops.admin import Operator
from consumer.ops.audit import run_audit
from consumer.ops.overview import add_replica_status, gather, render
from consumer.settings import Settings


def add_operator_commands(commands: Any) -> None:
    """Register the operator's subcommands on ``commands`` (argparse sub-parsers)."""
    commands.add_parser(
        "held", help="list what waits for a decision on a held manifest (withdrawals, uploads)"
    )
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
    for name, text in (
        ("pause", "send nothing more for an agency (its work waits; survives restarts)"),
        ("resume", "send what waited for a paused agency"),
    ):
        commands.add_parser(name, help=text).add_argument("agency")
    approve = commands.add_parser(
        "approve", help="start an agency's first publication, as the plan showed it"
    )
    approve.add_argument("agency")
    approve.add_argument("--plan", required=True, help="the fingerprint the plan printed")
    parked = commands.add_parser("parked", help="list parked documents and why they wait")
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
    replay = commands.add_parser(
        "replay", help="re-publish dead letters to their source topic, once each"
    )
    replay.add_argument("ids", nargs="*", metavar="ID", help="topic/partition/offset, as listed")
    replay.add_argument("--reason", help="every dead letter of this reason")
    replay.add_argument("--force", action="store_true", help="replay even if replayed before")


async def run_operator_command(settings: Settings, args: argparse.Namespace) -> int:
    """Run one operator subcommand and print its result as JSON; 1 if a replay was refused."""
    who = f"cli:{getpass.getuser()}@{socket.gethostname()}"
    code = 0
    async with Operator(settings) as operator:
        command = args.command
        result: Any
        if command == "status":
            return await _status(operator, args)
        if command == "held":
            result = {"held": await operator.held()}
        elif command in ("release", "discard"):
            result = await operator.queue(
                HeldAction(command), args.agency, args.building, requested_by=who
            )
        elif command in ("pause", "resume"):
            result = await operator.queue(AgencyAction(command), args.agency, requested_by=who)
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
            result = {
                "dead_letters": await operator.dead_letters(
                    reason=args.reason, source_topic=args.source_topic
                )
            }
        elif command == "replay":
            replayed = await operator.replay(args.ids, reason=args.reason, force=args.force)
            result = {"replayed": replayed}
            code = 1 if any(r["outcome"] != "replayed" for r in replayed) else 0
        else:
            raise ValueError(f"unknown command {command}")
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return code


async def _status(operator: Operator, args: argparse.Namespace) -> int:
    """Print the cluster's view per agency, once or every ``--watch`` seconds."""
    previous, sampled_at = None, 0.0
    while True:
        found = await gather(operator, agency=args.agency)
        # The rate is measured over the time between samples, gathering included (seconds on a
        # large cluster), not over the --watch pause alone.
        now = time.monotonic()
        elapsed, sampled_at = now - sampled_at, now
        for url in args.replica:
            add_replica_status(found, await _replica_status(url))
        if args.json:
            payload = {name: entry.plain() for name, entry in found.items()}
            text = orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode()
        else:
            text = render(found, previous, elapsed)
        if args.watch:
            sys.stdout.write("\x1b[2J\x1b[H")  # clear the terminal between refreshes
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
        return await _replica_audit(operator.settings, args)
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


async def _replica_audit(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """The audit run by a replica (``GET /admin/audit`` or ``POST /admin/audit/repair``)."""
    token = settings.http.admin_token()
    if token is None:
        raise ConfigError(
            "set CHOUETTE_RELAY_HTTP__ADMIN_TOKEN_FILE to the replica's admin token file to "
            "audit through --replica"
        )
    query = {"agency": args.agency, **({"building": args.building} if args.building else {})}
    path = "/admin/audit/repair" if args.repair else "/admin/audit"
    headers = {"Authorization": f"Bearer {token.get_secret_value()}"}
    # An audit lists every document of the agency at a share of its rate: minutes, not seconds.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.request(
            "POST" if args.repair else "GET",
            url=args.replica.rstrip("/") + path,
            params=query,
            headers=headers,
        ) as response,
    ):
        body: dict[str, Any] = await response.json(content_type=None)
        if response.status >= 400:
            raise ValueError(f"the replica refused the audit ({response.status}): {body}")
        return body


async def _replica_status(url: str) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url.rstrip("/") + "/status") as response,
    ):
        response.raise_for_status()
        status: dict[str, Any] = await response.json()
        return status
