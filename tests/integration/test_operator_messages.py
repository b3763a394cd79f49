"""Every mistake an operator can make in a setting, a mounted file or an argument is one line.

The line says what to fix, and the service says it before it connects to Kafka: the broker here
is an address where nothing listens, with a connect timeout far beyond each test's bound, so a
check made only after connecting would fail the test by its wording or its time.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.relay import AgencySpec, WorldFactory
from tests.integration.operator_helpers import cli_output, token_http

pytestmark = pytest.mark.integration

AGENCY = "agence-lyon"
ROUTING = f"""
[agencies.{AGENCY}]
modules = ["ag"]
first_publication = "fresh"
[agencies.{AGENCY}.condominia]
"bat-1" = "8841"
"""


@pytest.fixture
def configured(tmp_path: Path) -> dict[str, str]:
    """A complete production configuration whose broker does not answer."""
    keys = tmp_path / "api-keys"
    keys.mkdir()
    (keys / AGENCY).write_text("key-of-lyon\n", encoding="utf-8")
    (tmp_path / "routing.toml").write_text(ROUTING, encoding="utf-8")
    (tmp_path / "admin-token").write_text("the-token\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHOUETTE_RELAY_")}
    return env | {
        "CHOUETTE_RELAY_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{_closed_port()}",
        "CHOUETTE_RELAY_KAFKA__CONNECT_TIMEOUT_S": "600",
        "CHOUETTE_RELAY_PARTNER__BASE_URL": "http://127.0.0.1:9/api/v1",
        "CHOUETTE_RELAY_PARTNER__API_KEYS_DIR": str(keys),
        "CHOUETTE_RELAY_ROUTING_FILE": str(tmp_path / "routing.toml"),
        "CHOUETTE_RELAY_HTTP__ADMIN_TOKEN_FILE": str(tmp_path / "admin-token"),
        "CHOUETTE_RELAY_HTTP__HOST": "127.0.0.1",
        "CHOUETTE_RELAY_HTTP__PORT": "0",
        "CHOUETTE_RELAY_LOG_FORMAT": "json",
    }


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _refusal(env: dict[str, str], *args: str) -> str:
    """The one line ``chouette-relay ARGS`` says on stderr before exiting 2, within 30 s."""
    done = subprocess.run(  # noqa: S603 - the relay's own CLI, with this test's arguments
        [sys.executable, "-m", "consumer.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("chouette-relay: ")
    return lines[0]


@pytest.fixture
def listening() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield int(server.getsockname()[1])


def test_a_missing_admin_token_file_stops_the_service_before_kafka(
    configured: dict[str, str], tmp_path: Path
) -> None:
    configured["CHOUETTE_RELAY_HTTP__ADMIN_TOKEN_FILE"] = str(tmp_path / "no-such-token")
    line = _refusal(configured, "run")
    assert line == (
        "chouette-relay: CHOUETTE_RELAY_HTTP__ADMIN_TOKEN_FILE: "
        f"{tmp_path / 'no-such-token'} does not exist"
    )


def test_an_ops_port_in_use_stops_the_service_before_kafka_naming_the_setting(
    configured: dict[str, str], listening: int
) -> None:
    configured["CHOUETTE_RELAY_HTTP__PORT"] = str(listening)
    line = _refusal(configured, "run")
    assert f"port {listening} on 127.0.0.1 is not free" in line
    assert "set CHOUETTE_RELAY_HTTP__PORT to a free port" in line


def test_a_key_file_named_after_the_key_says_the_expected_name(
    configured: dict[str, str],
) -> None:
    keys = Path(configured["CHOUETTE_RELAY_PARTNER__API_KEYS_DIR"])
    (keys / AGENCY).rename(keys / f"{AGENCY}.key")
    line = _refusal(configured, "run")
    assert f"no API key file for agency {AGENCY}" in line
    assert f"{AGENCY}.key is there, but the file name must be the agency id alone" in line
    assert f"rename it {AGENCY}" in line


def test_an_unknown_routing_key_is_answered_with_the_one_meant(
    configured: dict[str, str],
) -> None:
    routing = Path(configured["CHOUETTE_RELAY_ROUTING_FILE"])
    routing.write_text(ROUTING.replace(".condominia]", ".condominiums]"), encoding="utf-8")
    line = _refusal(configured, "run")
    assert 'agencies.agence-lyon.condominiums: unknown setting (did you mean "condominia"?)' in line


def test_an_unreadable_ca_file_stops_the_service_before_kafka(
    configured: dict[str, str], tmp_path: Path
) -> None:
    configured["CHOUETTE_RELAY_PARTNER__CA_FILE"] = str(tmp_path / "no-ca.pem")
    line = _refusal(configured, "run")
    assert line == (
        f"chouette-relay: CHOUETTE_RELAY_PARTNER__CA_FILE: {tmp_path / 'no-ca.pem'} does not exist"
    )


def test_the_cli_says_the_admin_token_file_is_missing(
    configured: dict[str, str], tmp_path: Path
) -> None:
    configured["CHOUETTE_RELAY_HTTP__ADMIN_TOKEN_FILE"] = str(tmp_path / "no-such-token")
    line = _refusal(configured, "status", "--replica", "http://127.0.0.1:8080")
    assert line.endswith(f"HTTP__ADMIN_TOKEN_FILE: {tmp_path / 'no-such-token'} does not exist")


@pytest.mark.parametrize("command", [("status",), ("audit", "--agency", AGENCY)])
def test_a_replica_where_nothing_listens_is_one_line_with_how_to_reach_one(
    configured: dict[str, str], command: tuple[str, ...]
) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    line = _refusal(configured, *command, "--replica", url)
    assert f"cannot reach the replica at {url} (connection refused)" in line
    assert "kubectl -n kafka port-forward" in line


def test_a_replica_that_is_no_url_is_one_line(configured: dict[str, str]) -> None:
    line = _refusal(configured, "status", "--replica", "pod-1:8080")
    assert "--replica 'pod-1:8080' is not a replica's URL such as http://localhost:8080" in line


async def test_status_through_a_replica_checks_the_admin_token(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={"agence-a": AgencySpec(buildings={"bat-1": "c-1"})})
    http = token_http(world.tmp)
    relay = await world.start_relay(http=http)
    url = f"http://127.0.0.1:{relay.ops_port}"
    wrong = world.tmp / "wrong-token"
    wrong.write_text("not-the-token\n", encoding="utf-8")

    _, err = await cli_output(
        world,
        "status",
        "--replica",
        url,
        expect=2,
        http=http.model_copy(update={"admin_token_file": wrong}),
    )
    assert err.strip() == (
        f"chouette-relay: the replica at {url} refused the admin token: "
        "CHOUETTE_RELAY_HTTP__ADMIN_TOKEN_FILE must name the file of the token the replicas were "
        "started with"
    )
    text, _ = await cli_output(world, "status", "--replica", url, http=http)
    assert text.startswith("agence-a\n")


async def test_an_audit_the_replica_refuses_is_said_in_words(relay_world: WorldFactory) -> None:
    world = await relay_world(agencies={"agence-a": AgencySpec(buildings={"bat-1": "c-1"})})
    http = token_http(world.tmp)
    relay = await world.start_relay(http=http)
    url = f"http://127.0.0.1:{relay.ops_port}"

    _, err = await cli_output(
        world,
        "audit",
        "--agency",
        "agence-a",
        "--building",
        "bat-9",
        "--replica",
        url,
        expect=2,
        http=http,
    )
    [line] = err.splitlines()
    assert line.startswith("chouette-relay: the replica refused the audit (HTTP 4")
    assert "building bat-9" in line
    assert "{" not in line  # words, not a dict


def test_the_local_stack_checks_its_ops_port_before_starting_kafka(
    tmp_path: Path, listening: int
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHOUETTE_RELAY_")}
    env["CHOUETTE_RELAY_HTTP__PORT"] = str(listening)
    done = subprocess.run(
        [sys.executable, "-m", "consumer.cli", "run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done.stdout
    assert done.stderr.splitlines() == [
        f"chouette-relay: CHOUETTE_RELAY_HTTP__PORT: port {listening} on 127.0.0.1 is not free "
        "(Address already in use): stop what listens there, or start with "
        "CHOUETTE_RELAY_HTTP__PORT=0 (any free port; operator.env then names it $REPLICA)"
    ]


@pytest.mark.parametrize("command", [("status",), ("pause", AGENCY), ("dead-letters",)])
def test_an_operator_command_that_cannot_reach_kafka_says_it_in_one_line(
    configured: dict[str, str], command: tuple[str, ...]
) -> None:
    configured["CHOUETTE_RELAY_KAFKA__CONNECT_TIMEOUT_S"] = "5"
    line = _refusal(configured, *command)
    assert line.endswith("check CHOUETTE_RELAY_KAFKA__BOOTSTRAP_SERVERS and the network")
