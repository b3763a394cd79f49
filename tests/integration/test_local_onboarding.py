"""The README's onboarding, on ``make run``'s local stack, from a second terminal.

``make run DEMO_DOCUMENTS=N`` adds an agency whose N documents of history wait for approval and
writes ``var/local/operator.env``; with it, the operator's commands reach the stack: status says
the agency waits for approval, the plan shows the N uploads and the approval starts them, until
status shows them all on the partner. An audit through the relay then finds nothing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from consumer.local.demo import ONBOARDING

pytestmark = pytest.mark.integration

DOCUMENTS = 1200  # two buildings


def _operator_env(cwd: Path, base: dict[str, str]) -> dict[str, str]:
    """The environment of a shell that ran ``. var/local/operator.env``."""
    env = dict(base)
    for line in (cwd / "var" / "local" / "operator.env").read_text(encoding="utf-8").splitlines():
        if match := re.fullmatch(r"export ([A-Z_]+)=(.*)", line):
            env[match[1]] = match[2]
    return env


def _operator(cwd: Path, env: dict[str, str], *args: str) -> str:
    done = subprocess.run(  # noqa: S603 - the relay's own CLI, with this test's arguments
        [sys.executable, "-m", "consumer.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.5)  # polling a child process's effects, with a deadline


def test_an_agency_onboarded_on_the_local_stack_from_plan_to_audit(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHOUETTE_RELAY_")}
    run_env = base | {"CHOUETTE_RELAY_HTTP__PORT": "0"}
    output = tmp_path / "run.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(  # noqa: S603 - the relay's own CLI, with this test's arguments
            [sys.executable, "-m", "consumer.cli", "run", "--demo-documents", str(DOCUMENTS)],
            cwd=tmp_path,
            env=run_env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_for(lambda: "[local] onboarding" in output.read_text(encoding="utf-8"), "demo")
        env = _operator_env(tmp_path, base)

        waiting = _operator(tmp_path, env, "status", "--agency", ONBOARDING)
        assert f"waits for approval (chouette-relay plan --agency {ONBOARDING})" in waiting
        plan = orjson.loads(_operator(tmp_path, env, "plan", "--agency", ONBOARDING, "--json"))
        assert plan["uploads"] == DOCUMENTS
        _operator(tmp_path, env, "approve", ONBOARDING, "--plan", plan["fingerprints"][ONBOARDING])

        def all_published() -> bool:
            shown = orjson.loads(
                _operator(tmp_path, env, "status", "--agency", ONBOARDING, "--json")
            )
            entry = shown[ONBOARDING]
            return bool(entry["published"] == DOCUMENTS and entry["progress"] == 1.0)

        _wait_for(all_published, "first publication at 100 %")
        audit = orjson.loads(
            _operator(tmp_path, env, "audit", "--agency", ONBOARDING, "--replica", env["REPLICA"])
        )
        assert audit["findings"] == {"missing": 0, "unexpected": 0, "changed": 0}
        assert sum(c["partner_documents"] for c in audit["condominia"]) == DOCUMENTS
        assert audit["requests"]["agency_limiter"] is True
    finally:
        process.send_signal(signal.SIGINT)
        try:
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
