"""Admin HTTP never answers 500 to input, and input it refuses changes nothing.

Every admin route is driven with arbitrary paths, headers (an ``Authorization`` of any bytes,
UTF-8 or not) and bodies, over a raw socket so that nothing a client library would refuse to
send is left out. Each request carries at least one thing the relay must refuse: a malformed or
wrong token, an id the command model refuses, an agency or building the routing file does not
know, a body that is not what the route takes. The answer must be a 4xx, and afterwards nothing
was written to the commands topic and nothing is paused.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote, urlencode

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.app.relay import Relay
from consumer.core.deadletter import DEAD_LETTER_REASONS
from tests.fixtures.relay import AgencySpec, RelayWorld, WorldFactory
from tests.integration.operator_helpers import TOKEN, token_http

pytestmark = pytest.mark.integration

KNOWN, BUILDING = "agence-nantes", "bat-1"
FINGERPRINT = re.compile(r"[0-9a-f]{16,64}")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    authorization: bytes | None
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def encode(self) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1".encode(), b"Host: relay"]
        lines += [name + b": " + value for name, value in self.headers]
        if self.authorization is not None:
            lines.append(b"Authorization: " + self.authorization)
        lines += [b"Content-Length: " + str(len(self.body)).encode(), b"Connection: close"]
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.body


# -- what the fuzzer draws ---------------------------------------------------------------------
_LINE = st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_HEADER_NAMES = st.sampled_from(
    [b"Content-Type", b"Accept", b"X-Forwarded-For", b"Cookie", b"Authorization", b"Expect"]
)
_WRONG_AUTH = st.one_of(
    st.none(),
    _LINE,
    st.just(b"Bearer \xff\xfe"),
    st.just(b"bearer " + TOKEN.encode()),
    _LINE.map(lambda b: b"Bearer " + TOKEN.encode() + b),
).filter(lambda auth: auth != b"Bearer " + TOKEN.encode())
_UNKNOWN_AGENCY = st.one_of(
    st.text(max_size=70),
    st.sampled_from(["agence-nante", "AGENCE-NANTES", "..", "~agency", f"{KNOWN}:{BUILDING}"]),
).filter(lambda agency: agency != KNOWN)
_UNKNOWN_BUILDING = st.text(max_size=70).filter(lambda building: building != BUILDING)
_PLACE = st.one_of(
    st.tuples(_UNKNOWN_AGENCY, st.one_of(st.just(BUILDING), _UNKNOWN_BUILDING)),
    st.tuples(st.just(KNOWN), _UNKNOWN_BUILDING),
)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_BODY = st.one_of(st.binary(max_size=200), _JSON.map(orjson.dumps))


def _segment(text: str) -> str:
    return quote(text, safe="")


@st.composite
def _targeted(draw: st.DrawFn) -> tuple[str, str, bytes]:  # noqa: PLR0911 - a return per route
    """Method, path and body of one admin route, its target or body one the relay refuses."""
    agency, building = draw(_PLACE)
    a, b = _segment(agency), _segment(building)
    route = draw(st.integers(min_value=0, max_value=11))
    if route == 0:
        action = draw(st.sampled_from(["release", "discard"]))
        return "POST", f"/admin/held/{a}/{b}/{action}", draw(_BODY)
    if route == 1:
        action = draw(st.sampled_from(["pause", "resume"]))
        return "POST", f"/admin/agencies/{_segment(draw(_UNKNOWN_AGENCY))}/{action}", b""
    if route == 2:
        plan = draw(st.one_of(_JSON, st.text(max_size=70)))
        if agency == KNOWN and isinstance(plan, str) and FINGERPRINT.fullmatch(plan):
            plan = "not-a-fingerprint"
        body = draw(st.one_of(_BODY, st.just(orjson.dumps({"plan": plan}))))
        return "POST", f"/admin/agencies/{a}/approve", body
    if route == 3:
        return "POST", f"/admin/parked/{_segment(draw(_UNKNOWN_AGENCY))}/retry", draw(_BODY)
    if route == 4:
        return "POST", f"/admin/parked/{a}/{b}/retry", draw(_BODY)
    if route in (5, 6, 7):
        listing = {5: "/admin/plan", 6: "/admin/overview", 7: "/admin/parked"}[route]
        return "GET", f"{listing}?{urlencode({'agency': draw(_UNKNOWN_AGENCY)})}", b""
    if route in (8, 9):
        method, path = ("GET", "/admin/audit") if route == 8 else ("POST", "/admin/audit/repair")
        return method, f"{path}?{urlencode({'agency': agency, 'building': building})}", b""
    if route == 10:
        reason = draw(st.text(max_size=40).filter(lambda r: r not in DEAD_LETTER_REASONS))
        return "GET", f"/admin/dead-letters?{urlencode({'reason': reason})}", b""
    ids = draw(st.lists(st.text(max_size=40), max_size=3))
    named = draw(st.one_of(st.none(), st.text(max_size=30)))
    replay = {
        "ids": ids,
        "reason": None if named in DEAD_LETTER_REASONS else named,
        "force": draw(st.one_of(st.booleans(), _JSON)),
    }
    body = draw(st.one_of(st.just(orjson.dumps(replay)), _BODY))
    return "POST", "/admin/dead-letters/replay", body


@st.composite
def requests(draw: st.DrawFn) -> Request:
    """Any admin request: a refused target with the token, or anything without it."""
    headers = tuple(draw(st.lists(st.tuples(_HEADER_NAMES, _LINE), max_size=3)))
    if draw(st.booleans()):
        method, path, body = draw(_targeted())
        return Request(method, path, b"Bearer " + TOKEN.encode(), headers, body)
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
    tail = draw(st.text(max_size=80))
    path = draw(
        st.one_of(
            st.just("/admin/" + quote(tail, safe="/%?&=;:@")),
            st.sampled_from(["/admin/held", "/admin/dead-letters/replay", "/admin/plan"]),
            st.just(f"/admin/agencies/{KNOWN}/pause"),
            st.just(f"/admin/held/{KNOWN}/{BUILDING}/release"),
        )
    )
    return Request(method, path, draw(_WRONG_AUTH), headers, draw(_BODY))


# -- the relay under the fuzzer ----------------------------------------------------------------
@dataclass
class Target:
    world: RelayWorld
    relay: Relay
    offsets: AIOKafkaConsumer

    async def commands_written(self) -> int:
        partitions = [
            TopicPartition(self.world.commands_topic, p)
            for p in sorted(self.offsets.partitions_for_topic(self.world.commands_topic) or ())
        ]
        assert partitions
        ends = await self.offsets.end_offsets(partitions)
        return sum(ends.values())


@pytest.fixture
async def target(relay_world: WorldFactory) -> AsyncIterator[Target]:
    world = await relay_world(agencies={KNOWN: AgencySpec(buildings={BUILDING: "c-1"})})
    relay = await world.start_relay(http=token_http(world.tmp))
    offsets = AIOKafkaConsumer(bootstrap_servers=world.bootstrap)
    await offsets.start()
    await offsets.topics()
    try:
        yield Target(world, relay, offsets)
    finally:
        await offsets.stop()


async def answer(port: int, request: Request) -> int:
    """The status code the relay's ops server answers ``request`` with."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request.encode())
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line = response.split(b"\r\n", 1)[0]
    return int(status_line.split()[1])


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests())
async def test_every_admin_route_answers_4xx_to_input_it_refuses_and_changes_nothing(
    target: Target, request: Request
) -> None:
    assert target.relay.ops_port is not None

    status = await answer(target.relay.ops_port, request)

    assert 400 <= status < 500, request
    assert await target.commands_written() == 0
    assert target.relay.status()["paused"] == []
