"""Unknown targets are refused everywhere: by the replica, over HTTP and on the command line.

A command for an agency the routing file does not know (a typo in an urgent pause, a forged or
replayed record) is never obeyed. Written straight to the commands topic, it leaves no state
record and no metric series: the owning replica logs it once, counts it and shows it in
``/status``. The CLI exits 2 naming the agency and the closest known names; the admin endpoints
answer 404. Nothing is written to the commands topic for either.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from consumer.app.relay import Relay
from consumer.metrics import UNKNOWN_AGENCY
from tests.fixtures.relay import AgencySpec, RelayWorld, WorldFactory, metric, ops_get
from tests.integration.operator_helpers import TOKEN, call, cli_output, token_http

pytestmark = pytest.mark.integration

KNOWN = "agence-nantes"
FORGED = 2_000
ACTIONS = ("pause", "resume", "approve", "retry", "release")


def forged_command(number: int) -> tuple[bytes, bytes]:
    """Key and value of a well-formed command for an agency no routing file knows."""
    agency, action = f"agence-x{number}", ACTIONS[number % len(ACTIONS)]
    body: dict[str, Any] = {
        "schema_version": 1,
        "command": action,
        "agency_id": agency,
        "requested_at": "2026-01-02T03:04:05Z",
        "requested_by": "forged",
    }
    if action == "approve":
        body["plan"] = "0123456789abcdef"
    if action == "release":
        body["building_id"] = "bat-1"
    key = f"{agency}:bat-1" if action == "release" else agency
    return key.encode(), orjson.dumps(body)


def commands_read(relay: Relay) -> float:
    """Command records the relay has read (carried out or not)."""
    return sum(
        sample.value
        for family in relay.metrics.events.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["kind"] == "operator-command"
    )


def refused(relay: Relay) -> dict[str, Any]:
    found: dict[str, Any] = relay.status()["refused_commands"]
    return found


async def world_with_relay(relay_world: WorldFactory) -> tuple[RelayWorld, Relay]:
    world = await relay_world(agencies={KNOWN: AgencySpec(buildings={"bat-1": "c-1"})})
    relay = await world.start_relay(http=token_http(world.tmp))
    return world, relay


async def test_forged_commands_for_unknown_agencies_leave_no_state_and_no_metric_series(
    relay_world: WorldFactory,
) -> None:
    world, relay = await world_with_relay(relay_world)
    producer = await world.producer()
    deliveries = [
        await producer.send(world.commands_topic, key=key, value=value)
        for key, value in map(forged_command, range(FORGED))
    ]
    unmapped = {"schema_version": 1, "command": "retry", "agency_id": KNOWN}
    unmapped |= {"building_id": "bat-99", "requested_at": "2026-01-02T03:04:05Z"}
    deliveries.append(
        await producer.send(
            world.commands_topic, key=f"{KNOWN}:bat-99".encode(), value=orjson.dumps(unmapped)
        )
    )
    await asyncio.gather(*deliveries)

    await world.wait_until(
        lambda: commands_read(relay) == FORGED + 1, timeout=120, what="every command read"
    )

    state = await world.read_topic(world.state_topic)
    assert [record.key for record in state] == []
    assert relay.status()["paused"] == []
    assert refused(relay)["total"] == FORGED + 1
    text = await ops_get(relay, "/metrics")
    labelled = {
        sample.labels["agency"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "agency" in sample.labels
    }
    # 2,000 unknown agencies add no series: only the routing's agency and the one fixed label
    # that counts what names none of them.
    assert labelled <= {KNOWN, UNKNOWN_AGENCY}
    for action in ACTIONS:
        counted = await metric(
            relay, "chouette_relay_commands_total", kind=action, outcome="unknown_agency"
        )
        assert counted == FORGED / len(ACTIONS)
    assert await metric(
        relay, "chouette_relay_commands_total", kind="retry", outcome="unknown_building"
    )
    newest = orjson.loads(await ops_get(relay, "/status"))["refused_commands"]["newest"]
    assert len(newest) == 20  # the newest few, not all 2,001
    assert {entry["reason"] for entry in newest} <= {"unknown_agency", "unknown_building"}
    assert all(entry["requested_by"] in ("forged", "unknown") for entry in newest)


async def test_the_admin_endpoints_answer_404_for_an_unknown_agency_or_building(
    relay_world: WorldFactory,
) -> None:
    world, relay = await world_with_relay(relay_world)

    for path in (
        "/admin/agencies/agence-nante/pause",
        "/admin/agencies/agence-nante/resume",
        "/admin/parked/agence-nante/retry",
        "/admin/held/agence-nante/bat-1/release",
        "/admin/held/agence-nante/bat-1/discard",
    ):
        status, body = await call(relay, "POST", path, token=True)
        assert (path, status) == (path, 404)
        assert body["agency"] == "agence-nante"
        assert body["closest"] == [KNOWN]
    status, body = await call(
        relay, "POST", "/admin/agencies/agence-nante/approve", token=True, body={"plan": "ab" * 8}
    )
    assert (status, body["closest"]) == (404, [KNOWN])
    status, body = await call(relay, "POST", f"/admin/parked/{KNOWN}/bat-99/retry", token=True)
    assert (status, body["building"]) == (404, "bat-99")
    for listing in ("/admin/parked", "/admin/plan", "/admin/overview", "/admin/audit"):
        status, body = await call(relay, "GET", f"{listing}?agency=agence-nante", token=True)
        assert (listing, status) == (listing, 404)
    # an id the command model refuses is the request's fault, not the relay's
    status, body = await call(relay, "POST", "/admin/held/agence%20a/bat-1/release", token=True)
    assert status == 400
    assert "agency_id" in body["error"]

    assert await world.read_topic(world.commands_topic) == []


async def _status_of(relay: Relay, request_line: bytes, *headers: bytes) -> bytes:
    """The status code of a request sent as raw bytes (no client library cleans it up)."""
    assert relay.ops_port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.ops_port)
    writer.write(b"\r\n".join([request_line, b"Host: relay", b"Connection: close", *headers]))
    writer.write(b"\r\n\r\n")
    status_line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    status: bytes = status_line.split()[1]
    return status


async def test_headers_that_are_not_utf8_and_unknown_routes_are_4xx(
    relay_world: WorldFactory,
) -> None:
    _, relay = await world_with_relay(relay_world)
    held = b"GET /admin/held HTTP/1.1"
    for authorization in (b"Bearer \xff\xfe", b"\xc3(", b"Bearer " + TOKEN.encode() + b"\x80"):
        assert await _status_of(relay, held, b"Authorization: " + authorization) == b"401"
    token = b"Authorization: Bearer " + TOKEN.encode()
    assert await _status_of(relay, held, token) == b"200"
    for line in (held, b"POST /admin/nowhere HTTP/1.1"):
        assert await _status_of(relay, line, token, b"Expect: \x80") == b"417"
    assert await _status_of(relay, b"PUT /admin/held HTTP/1.1", token) == b"405"
    assert await _status_of(relay, b"GET /admin/nowhere HTTP/1.1", token) == b"404"


async def test_the_cli_exits_2_naming_an_unknown_agency_and_the_closest_known_one(
    relay_world: WorldFactory,
) -> None:
    world, _ = await world_with_relay(relay_world)

    _, err = await cli_output(world, "pause", "agence-nante", expect=2)
    assert "agency agence-nante is not in the routing file; did you mean agence-nantes?" in err
    _, err = await cli_output(world, "retry", KNOWN, "bat-99", expect=2)
    assert f"building bat-99 of agency {KNOWN} is not in the routing file" in err
    # A listing by agency too: nothing found for a name the routing file does not know is a typo.
    for listing in ("held", "parked", "dead-letters", "history"):
        _, err = await cli_output(world, listing, "--agency", "agence-nante", expect=2)
        assert "agency agence-nante is not in the routing file; did you mean agence-nantes?" in err
    await cli_output(world, "held", "--agency", KNOWN, expect=0)

    assert await world.read_topic(world.commands_topic) == []
