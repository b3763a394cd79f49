"""In the container the relay is PID 1, with no init process in front of it.

The kernel delivers to a PID namespace's init only the signals it has a handler for, so an
entrypoint that relied on the default action of SIGTERM would never stop before Kubernetes kills
it. The relay installs its own handler; this test runs ``chouette-relay run`` as PID 1 of a new PID
namespace (as the image's exec-form entrypoint does) and checks that SIGTERM from outside drains,
commits and exits 0.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from consumer.local.kafka import free_port
from consumer.settings import HttpSettings
from tests.fixtures.relay import AgencySpec, WorldFactory, uncommitted_records

pytestmark = pytest.mark.integration

AGENCY = "agence-a"


def as_pid_1(command: list[str]) -> list[str]:
    """``command`` as PID 1 of a new PID namespace, or skip where namespaces are not allowed."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed")
    wrapped = [unshare, "--pid", "--fork", "--kill-child"]
    probe = subprocess.run(  # noqa: S603 - util-linux unshare, fixed arguments
        [*wrapped, "true"], capture_output=True, check=False, timeout=30
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here: {probe.stderr.decode().strip()}")
    return [*wrapped, *command]


def namespace_pids(host_pid: int) -> list[int]:
    """The process's PID in each namespace it belongs to, outermost first (``NSpid``)."""
    for line in Path(f"/proc/{host_pid}/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("NSpid:"):
            return [int(pid) for pid in line.split()[1:]]
    return [host_pid]


def spawn(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(  # noqa: S603 - this interpreter under unshare
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def only_child(pid: int) -> int:
    """The process that unshare forked: the relay, as seen from this namespace."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text(encoding="utf-8").split()
    assert len(children) == 1, f"unshare has children {children}"
    return int(children[0])


async def ready(port: int) -> bool:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/readyz") as response,
        ):
            return response.status == 200
    except aiohttp.ClientConnectionError:
        return False


async def test_the_relay_as_pid_1_drains_and_exits_on_sigterm(
    relay_world: WorldFactory, tmp_path: Path
) -> None:
    command = as_pid_1([sys.executable, "-m", "consumer.cli", "run"])
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    port = free_port()
    log_path = tmp_path / "relay.log"
    process = spawn(
        command, world.environment(http=HttpSettings(host="127.0.0.1", port=port)), log_path
    )
    world.processes.append(process)
    await world.wait_until(lambda: ready(port), timeout=60, what="the relay ready")
    relay_pid = only_child(process.pid)
    assert namespace_pids(relay_pid)[-1] == 1, "the relay is not PID 1 of its namespace"

    document = world.document()
    await world.publish(world.document_created(AGENCY, "bat-1", document))
    await world.wait_until(
        lambda: document["id"] in world.partner_references("c-1"), what="the upload"
    )
    os.kill(relay_pid, signal.SIGTERM)

    # Polled, not process.wait(): the sandbox serving the draining relay runs on this loop.
    await world.wait_until(lambda: process.poll() is not None, timeout=60, what="the exit")
    log = log_path.read_text(encoding="utf-8", errors="replace")
    assert process.returncode == 0, log[-2000:]
    assert "stopped cleanly" in log
    assert await uncommitted_records(world) == 0
