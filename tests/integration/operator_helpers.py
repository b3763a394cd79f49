"""Helpers of the operator tests: the admin endpoints with the bearer token, and the CLI."""

from __future__ import annotations

import asyncio
import copy
import os
import pty
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from consumer.app.relay import Relay
from consumer.settings import HttpSettings
from tests.fixtures.relay import RelayWorld

TOKEN = "operator-admin-token"


def token_http(tmp: Path) -> HttpSettings:
    token_file = tmp / "admin-token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    return HttpSettings(host="127.0.0.1", port=0, admin_token_file=token_file)


async def call(
    relay: Relay, method: str, path: str, *, token: bool = False, body: Any = None
) -> tuple[int, Any]:
    """Status and JSON body of an ops request, with the admin bearer token if ``token``."""
    assert relay.ops_port is not None
    headers = {"Authorization": f"Bearer {TOKEN}"} if token else {}
    url = f"http://127.0.0.1:{relay.ops_port}{path}"
    data = None if body is None else orjson.dumps(body)
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers, data=data) as response,
    ):
        return response.status, await response.json()


async def cli(world: RelayWorld, *args: str, expect: int = 0, **settings: Any) -> Any:
    """Run ``chouette-relay ARGS`` as an operator would, with the relay's environment (and
    ``settings`` overriding groups of it)."""
    out, _ = await cli_output(world, *args, expect=expect, **settings)
    return orjson.loads(out)


async def cli_terminal(world: RelayWorld, *args: str) -> str:
    """What ``chouette-relay ARGS`` shows on a terminal (a pseudo-terminal as its output)."""
    leader, follower = pty.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "consumer.cli",
            *args,
            env=world.environment(),
            stdout=follower,
            stderr=asyncio.subprocess.PIPE,
        )
        os.close(follower)
        follower = -1
        chunks: list[bytes] = []
        loop = asyncio.get_running_loop()
        while True:
            try:
                chunk = await loop.run_in_executor(None, os.read, leader, 65536)
            except OSError:  # EIO: the command exited and closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        _, err = await asyncio.wait_for(process.communicate(), timeout=120)
        assert process.returncode == 0, err.decode()
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)
    return b"".join(chunks).decode().replace("\r\n", "\n")


async def cli_output(
    world: RelayWorld, *args: str, expect: int = 0, **settings: Any
) -> tuple[str, str]:
    """Standard output and error of ``chouette-relay ARGS``, which must exit with ``expect``."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumer.cli",
        *args,
        env=world.environment(**settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == expect, err.decode()
    return out.decode(), err.decode()


def many_documents(world: RelayWorld, count: int) -> list[dict[str, Any]]:
    """``count`` documents sharing one stored PDF: what matters is how many there are."""
    model = world.document()
    return [{**copy.deepcopy(model), "id": f"history-{n}:1"} for n in range(count)]


async def live_document_sent(
    world: RelayWorld, agency: str, building: str, condominium: str, *, within: float, what: str
) -> None:
    """Publish a new document-created event and wait until ChouetteCopro holds the document."""
    live = world.document()
    await world.publish(world.document_created(agency, building, live))
    await world.wait_until(
        lambda: live["id"] in world.partner_references(condominium), timeout=within, what=what
    )
