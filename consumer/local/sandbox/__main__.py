"""``python -m consumer.local.sandbox``: the sandbox alone, in the foreground, until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from pathlib import Path

import consumer.local.sandbox as package
from consumer.local.sandbox.accounts import DEMO_API_KEY, Account, RateLimit, load_accounts
from consumer.local.sandbox.server import SandboxServer

logger = logging.getLogger(__name__)


async def _serve(args: argparse.Namespace) -> None:
    limit = RateLimit(args.rate, args.burst) if args.rate else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if args.accounts_file is None:
        accounts = {DEMO_API_KEY: Account(frozenset({"c-1", "c-2"}))}
        logger.info(
            "no --accounts-file: one account, key %s, on condominia c-1 and c-2", DEMO_API_KEY
        )
    else:
        accounts = load_accounts(args.accounts_file)
    sandbox = SandboxServer(
        accounts=accounts,
        rate_limit=limit,
        keep_bytes=args.keep_bytes,
        host=args.host,
        port=args.port,
    )
    async with sandbox:
        logger.info("ChouetteCopro sandbox listening at %s", sandbox.base_url)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m consumer.local.sandbox", description=package.__doc__
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--accounts-file", type=Path, help="JSON: API key -> condominia")
    parser.add_argument("--rate", type=float, default=None, help="default requests/s per key")
    parser.add_argument("--burst", type=int, default=10, help="default burst per key")
    parser.add_argument("--keep-bytes", action="store_true", help="keep uploaded files in memory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
