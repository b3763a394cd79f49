"""A normal start, some forwarding and a Ctrl-C stop print nothing alarming.

An operator learns to ignore a log that cries wolf. These tests run ``chouette-relay run`` as a
child process and read every line it prints: nothing at WARNING or above unless something
deserves it (the demo's deliberate poison record), and no stray output such as tracebacks or
"Unclosed" resource warnings.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer.local.demo import AGENCIES
from tests.fixtures.relay import AgencySpec, RelayWorld, WorldFactory

pytestmark = pytest.mark.integration

ALARMING = {"warning", "error", "critical"}


def read_output(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """JSON log entries, and every other line (the local stack's own lines start ``[local]``)."""
    entries, others = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("{"):
            entries.append(orjson.loads(line))
        elif line.strip():
            others.append(line)
    return entries, others


async def stop_with_ctrl_c(world: RelayWorld, process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGINT)
    # Polled, not process.wait(): the sandbox serving the draining relay runs on this loop.
    await world.wait_until(lambda: process.poll() is not None, timeout=60, what="the exit")
    assert process.returncode is not None
    return process.returncode


async def test_start_forwarding_and_ctrl_c_log_nothing_at_warning_or_above(
    relay_world: WorldFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONWARNINGS", "default")  # "Unclosed ..." resource warnings show
    world = await relay_world(
        agencies={
            "agence-a": AgencySpec(buildings={"b-1": "c-a-1"}),
            "agence-b": AgencySpec(buildings={"b-2": "c-b-2"}),
        }
    )
    log_path = tmp_path / "relay.log"
    process = world.spawn_relay(log_path)
    for agency, building in (("agence-a", "b-1"), ("agence-b", "b-2")):
        items = [world.document(inline=True) for _ in range(5)]
        await world.publish(*world.manifest_parts(agency, building, items))
        await world.publish(world.document_created(agency, building, world.document(inline=True)))
    await world.wait_until(lambda: len(world.partner_references()) == 12, timeout=60, what="12")

    assert await stop_with_ctrl_c(world, process) == 0

    entries, others = read_output(log_path)
    assert [e for e in entries if e["level"] in ALARMING] == []
    assert others == []
    assert "stopped cleanly" in [e["msg"] for e in entries]


def test_make_run_starts_forwards_and_stops_without_alarm(tmp_path: Path) -> None:
    """The local default (its own broker, like ``make run``); its output is piped, so JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHOUETTE_RELAY_")}
    env |= {"CHOUETTE_RELAY_HTTP__PORT": "0", "PYTHONWARNINGS": "default"}
    env.pop("NO_COLOR", None)
    output = tmp_path / "run.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "consumer.cli", "run"],
            cwd=tmp_path,  # the local stack writes its configuration under ./var/local
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_for_text(process, output, "dead letters 1")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)

    entries, others = read_output(output)
    alarming = [e for e in entries if e["level"] in ALARMING]
    # The demo publishes one poison record on purpose: its dead-lettering is the one warning.
    assert [(e["msg"], e.get("reason")) for e in alarming] == [
        ("dead-lettered input record", "not_json")
    ]
    assert [line for line in others if not line.startswith("[local] ")] == []
    assert others[-1] == "[local] stopped."
    # Not a terminal: the progress view prints a plain line per agency as its figures change.
    for agency in AGENCIES:
        assert any(re.match(rf"\[local\] {agency}: sandbox \d+, pending", o) for o in others)


def _wait_for_text(process: subprocess.Popen[bytes], path: Path, text: str) -> None:
    deadline = time.monotonic() + 120
    while text not in path.read_text(encoding="utf-8"):
        assert process.poll() is None, path.read_text(encoding="utf-8")[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in the output within 120 s"
        time.sleep(0.2)  # polling the child's output, with a deadline


async def test_a_start_awaiting_approval_and_an_operator_command_are_said_once_at_info(
    relay_world: WorldFactory, tmp_path: Path
) -> None:
    """Buildings waiting for approval are what the routing asked for: one INFO line per agency
    across every partition the replica owns, with what waits (buildings, documents), not a line
    per building or per partition; a command at INFO, without ``building=None``; no line about
    no partitions."""
    waiting = {
        "agence-a": {f"bat-{n}": f"c-{n}" for n in range(12)},
        "agence-b": {f"imm-{n}": f"d-{n}" for n in range(5)},
    }
    world = await relay_world(
        agencies={
            agency: AgencySpec(buildings=buildings, approval="operator")
            for agency, buildings in waiting.items()
        },
        partitions=4,
    )
    # Read at the start, from the uncommitted input, as after a restart.
    for agency, buildings in waiting.items():
        for building in buildings:
            documents = [world.document(), world.document()]
            await world.publish(*world.manifest_parts(agency, building, documents))
    log_path = tmp_path / "relay.log"
    process = world.spawn_relay(log_path)

    def said(message: str) -> list[dict[str, Any]]:
        return [e for e in read_output(log_path)[0] if e["msg"] == message]

    def announced() -> bool:
        return len(said("first publication awaits an operator's approval")) == len(waiting)

    await world.wait_until(announced, timeout=60, what="the agencies' waiting, said")
    pause = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumer.cli", "pause", "agence-a", env=world.environment()
    )
    assert await pause.wait() == 0
    await world.wait_until(lambda: len(said("operator command")) == 4, what="the pause, applied")
    assert await stop_with_ctrl_c(world, process) == 0

    entries, _ = read_output(log_path)
    assert [e for e in entries if e["level"] in ALARMING] == []
    lines = said("first publication awaits an operator's approval")
    assert sorted((e["level"], e["agency"], e["buildings"], e["documents"]) for e in lines) == [
        ("info", "agence-a", 12, 24),
        ("info", "agence-b", 5, 10),
    ]
    commands = said("operator command")
    assert {e["level"] for e in commands} == {"info"}
    assert not any("building" in e for e in commands)
    assert not [e for e in entries if any(v == [] for v in e.values())]
