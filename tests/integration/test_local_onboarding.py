"""The README's onboarding, on ``make run``'s local stack, from a second terminal.

``make run DEMO_DOCUMENTS=N`` adds an agency whose N documents of history wait for approval and
writes ``var/local/operator.env``; sourced in a fresh shell, from any folder, it makes the README's
steps work as written: status says the agency waits for approval, the plan shows the N uploads and
the approval starts them, until status shows them all on the partner. An audit through the relay
(``--replica $REPLICA``) then finds nothing. A second stack started from the same folder meanwhile
is refused and touches none of the running one's files.
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


def _operator(operator_env: Path, elsewhere: Path, command: str) -> str:
    """``command`` as the README writes it, in a fresh shell that sourced operator.env, from
    another folder, with no virtualenv on PATH."""
    script = '. "$0" && cd "$1" && eval "$2"'
    done = subprocess.run(  # noqa: S603 - the relay's own CLI, with this test's arguments
        ["/bin/bash", "--noprofile", "--norc", "-c", script, operator_env, elsewhere, command],
        env={"PATH": "/usr/bin:/bin", "HOME": str(elsewhere), "LANG": "C.UTF-8"},
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
        local = tmp_path / "var" / "local"
        operator_env = local / "operator.env"
        assert f". {operator_env}; chouette-relay status" in output.read_text(encoding="utf-8")
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()

        # A second stack from the same folder is refused and leaves the running one's files.
        second = subprocess.run(
            [sys.executable, "-m", "consumer.cli", "run"],
            cwd=tmp_path,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 2, second.stderr
        assert second.stderr.startswith(f"chouette-relay: a local stack already runs from {local}")
        assert f"pid {process.pid}" in second.stderr
        assert ONBOARDING in (local / "routing.toml").read_text(encoding="utf-8")
        assert (local / "api-keys" / ONBOARDING).is_file()

        waiting = _operator(operator_env, elsewhere, f"chouette-relay status --agency {ONBOARDING}")
        assert f"waits for approval (chouette-relay plan --agency {ONBOARDING})" in waiting
        plan = orjson.loads(
            _operator(operator_env, elsewhere, f"chouette-relay plan --agency {ONBOARDING} --json")
        )
        assert plan["uploads"] == DOCUMENTS
        fingerprint = plan["fingerprints"][ONBOARDING]
        _operator(
            operator_env, elsewhere, f"chouette-relay approve {ONBOARDING} --plan {fingerprint}"
        )

        def all_published() -> bool:
            shown = orjson.loads(
                _operator(
                    operator_env, elsewhere, f"chouette-relay status --agency {ONBOARDING} --json"
                )
            )
            entry = shown[ONBOARDING]
            return bool(entry["published"] == DOCUMENTS and entry["progress"] == 1.0)

        _wait_for(all_published, "first publication at 100 %")
        audit = orjson.loads(
            _operator(
                operator_env,
                elsewhere,
                f"chouette-relay audit --agency {ONBOARDING} --replica $REPLICA",
            )
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


def _stack(cwd: Path, output: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHOUETTE_RELAY_")}
    with output.open("wb") as sink:
        return subprocess.Popen(  # noqa: S603 - the relay's own CLI, with this test's arguments
            [sys.executable, "-m", "consumer.cli", "run", *args],
            cwd=cwd,
            env=env | {"CHOUETTE_RELAY_HTTP__PORT": "0"},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_a_kept_local_stack_starts_again_where_it_stopped(tmp_path: Path) -> None:
    """``make run KEEP=1``: a pause and an approval survive the restart, the documents still
    to send are still served, and what was sent is still on the sandbox."""
    documents = 200
    args = ("--demo-documents", str(documents), "--keep-data")
    operator_env = tmp_path / "var" / "local" / "operator.env"
    first_output = tmp_path / "first.out"
    first = _stack(tmp_path, first_output, *args)
    try:
        _wait_for(lambda: "[local] onboarding" in first_output.read_text(encoding="utf-8"), "demo")
        _operator(operator_env, tmp_path, f"chouette-relay pause {ONBOARDING}")
        plan = orjson.loads(
            _operator(operator_env, tmp_path, f"chouette-relay plan --agency {ONBOARDING} --json")
        )
        fingerprint = plan["fingerprints"][ONBOARDING]
        _operator(
            operator_env, tmp_path, f"chouette-relay approve {ONBOARDING} --plan {fingerprint}"
        )

        def paused_and_lyon_sent() -> bool:
            shown = orjson.loads(_operator(operator_env, tmp_path, "chouette-relay status --json"))
            return bool(shown[ONBOARDING]["paused"] and shown["agence-lyon"]["progress"] == 1.0)

        _wait_for(paused_and_lyon_sent, "the pause, and agence-lyon published")
    finally:
        _stop(first)
    assert "[local] kept" in first_output.read_text(encoding="utf-8")

    second_output = tmp_path / "second.out"
    second = _stack(tmp_path, second_output, *args)
    try:
        _wait_for(
            lambda: "not published again" in second_output.read_text(encoding="utf-8"), "start"
        )
        shown = orjson.loads(
            _operator(operator_env, tmp_path, f"chouette-relay status --agency {ONBOARDING} --json")
        )
        assert (shown[ONBOARDING]["paused"], shown[ONBOARDING]["published"]) == (True, 0)
        _wait_for(
            lambda: (
                re.search(
                    rf"\[local\] {ONBOARDING}: .*, PAUSED$",
                    second_output.read_text(encoding="utf-8"),
                    flags=re.MULTILINE,
                )
                is not None
            ),
            "the pause in the stack's table",
        )
        _operator(operator_env, tmp_path, f"chouette-relay resume {ONBOARDING}")

        def all_published() -> bool:
            shown = orjson.loads(
                _operator(
                    operator_env, tmp_path, f"chouette-relay status --agency {ONBOARDING} --json"
                )
            )
            return bool(shown[ONBOARDING]["published"] == documents)

        _wait_for(all_published, "the first publication after the restart")
        for agency in (ONBOARDING, "agence-lyon"):
            audit = orjson.loads(
                _operator(
                    operator_env,
                    tmp_path,
                    f"chouette-relay audit --agency {agency} --replica $REPLICA",
                )
            )
            assert audit["findings"] == {"missing": 0, "unexpected": 0, "changed": 0}, agency
    finally:
        _stop(second)
