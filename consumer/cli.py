"""Command line: ``chouette-relay run | plan`` and the operator's commands.

``run`` starts the service (on the embedded local default when no Kafka and partner settings are
given); ``plan`` is the dry run of a first publication and sends nothing. The operator's commands
(held deletions, pause and resume, parked documents, dead letters) are in
``consumer.ops.cli_operator``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import version

from consumer.errors import ConfigError
from consumer.ops.cli_operator import add_operator_commands, run_operator_command
from consumer.ops.logs import configure_logging
from consumer.ops.webserver import listen_problem
from consumer.settings import ENV_PREFIX, Settings, load_settings

log = logging.getLogger("consumer")


_SETTINGS_HELP = """\
settings:
  Every command reads its settings from CHOUETTE_RELAY_* environment variables (groups separated
  by __, e.g. CHOUETTE_RELAY_KAFKA__BOOTSTRAP_SERVERS, CHOUETTE_RELAY_ROUTING_FILE,
  CHOUETTE_RELAY_HTTP__ADMIN_TOKEN_FILE); the README's "Configuration" lists them all. With none
  of the Kafka and partner settings, `run` starts the local stack, which writes
  var/local/operator.env: source it (. var/local/operator.env) in another shell, and every
  operator command reaches that stack ($REPLICA is its ops server, for --replica).

exit codes: 0 done; 1 the relay stopped on a failure, a replay was refused, or a replica refused
an operator command (the outcome says why); 2 a setting or an argument to fix, or a request
refused (one line says why); 3 `plan --detailed-exitcode` has something to send; 4 an operator
command's replicas did not all answer within --wait-s; 130 interrupted."""
_RUN_EXAMPLES = """\
examples:
  chouette-relay run                          the service, on its settings
  chouette-relay run --demo-documents 20000   the local stack, with an agency to onboard
  chouette-relay run --keep-data              the local stack, starting where it stopped"""
_PLAN_EXAMPLES = """\
examples:
  chouette-relay plan --agency agence-lyon    then: approve agence-lyon --plan FINGERPRINT
  chouette-relay plan --detailed-exitcode     exit 0: no changes; 3: something to send"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chouette-relay",
        description="Forwards LSC's documents to ChouetteCopro. Run the relay, look at what a "
        "first publication would send, or act on the relay as an operator; every operator "
        "command reads and writes Kafka, so it works from any pod.",
        epilog=_SETTINGS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"chouette-relay {version('chouette-relay')}"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="run the relay (local default when nothing is configured)",
        epilog=_RUN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--demo-documents",
        type=int,
        default=0,
        metavar="N",
        help="local default only: add an agency being onboarded, N documents awaiting approval",
    )
    run.add_argument(
        "--keep-data",
        action="store_true",
        help="local default only: keep the broker's data in var/local/kafka and start from it "
        "next time (pauses, approvals and offsets survive; the demo is published once)",
    )
    plan = commands.add_parser(
        "plan",
        help="dry run of a first publication; sends nothing",
        epilog=_PLAN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("--agency", help="only this agency")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.add_argument(
        "--detailed-exitcode",
        action="store_true",
        help='exit 0 when there is nothing to send ("No changes"), 3 when there is',
    )
    add_operator_commands(commands)
    args = parser.parse_args(argv)

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"chouette-relay: {exc}", file=sys.stderr)
        return 2
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    if args.command != "run":
        # An operator command's output is its result (JSON or a table); its logs go aside.
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(sys.stderr)
        if settings.log_level != "DEBUG":
            # A command that cannot reach Kafka says so in one line naming the setting; the
            # client's own retries and errors on the way are for LOG_LEVEL=DEBUG.
            logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        if args.command == "run":
            return asyncio.run(
                _run(settings, demo_documents=args.demo_documents, keep_data=args.keep_data)
            )
        if args.command == "plan":
            from consumer.ops.dryrun import print_plan  # noqa: PLC0415 - only this command needs it

            return asyncio.run(
                print_plan(
                    settings,
                    agency=args.agency,
                    as_json=args.json,
                    detailed_exitcode=args.detailed_exitcode,
                )
            )
        return asyncio.run(run_operator_command(settings, args))
    except (ConfigError, ValueError) as exc:
        print(f"chouette-relay: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


async def _run(settings: Settings, *, demo_documents: int = 0, keep_data: bool = False) -> int:
    if settings.is_local:
        from consumer.local.stack import run_local  # noqa: PLC0415 - the local stack is optional

        return await run_local(settings, onboarding=demo_documents, keep_data=keep_data)
    if demo_documents or keep_data:
        raise ConfigError(
            "--demo-documents and --keep-data are for the local default (no Kafka/partner settings)"
        )
    from consumer.app.relay import Relay  # noqa: PLC0415 - keeps `plan` and admin commands light
    from consumer.core.routing import load_routing  # noqa: PLC0415
    from consumer.partner.keys import ApiKeyStore  # noqa: PLC0415

    # Everything that can be checked without Kafka is checked first: a mistake in a mounted file
    # or a port in use is one line now, not a traceback after connecting and restoring.
    if settings.routing_file is None:
        raise ConfigError("CHOUETTE_RELAY_ROUTING_FILE is not set")
    routing = load_routing(settings.routing_file)
    api_keys = ApiKeyStore(settings.partner.api_keys_dir)
    api_keys.check_covers(routing.agencies)
    settings.http.admin_token()
    check_ops_port(settings.http.host, settings.http.port)
    log.info("effective settings", extra={"settings": settings.masked()})
    relay = Relay(settings=settings, routing=routing, api_keys=api_keys)  # checks the CA files
    relay.install_signal_handlers()
    await relay.run()
    return 1 if relay.failure is not None else 0


def check_ops_port(host: str, port: int) -> None:
    """Refuse to start when the ops server could not listen, naming the setting to change."""
    if problem := listen_problem(host, port):
        raise ConfigError(
            f"{ENV_PREFIX}HTTP__PORT: {problem}: stop what listens there (another relay?) or set "
            f"{ENV_PREFIX}HTTP__PORT to a free port"
        )


if __name__ == "__main__":
    sys.exit(main())
