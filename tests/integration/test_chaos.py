"""Chaos: a seeded mix of good and bad records, partner faults and relay restarts ends exactly.

A relay in a child process reads, on the real broker, a few hundred records of several agencies
and buildings (``tests.chaos.stream``): documents created and changed, manifests in parts, some
late, some twice, events published twice, a snapshot id shared by two buildings, and between them
the records LSC gets wrong. Meanwhile the sandbox fails, slows down, goes away and rate-limits,
the document store slows down, and the relay is stopped (SIGTERM) or killed (SIGKILL) at random
moments and started again. In the end the sandbox must hold exactly LSC's truth as routing
forwards it, each document created once; what routing parks must be parked with its reason (the
view and ``/status``); every bad record must be a dead letter with its reason, and nothing else;
the committed offsets must reach the end; no API key may appear in a log line, a dead letter,
a state record or ``/status``.

Every run prints its seed; ``CHOUETTE_RELAY_CHAOS_SEED=<seed>`` runs the same stream again. A
document created more than once, when everything else holds, ends the test as an expected failure
naming the seed and the log. It was seen once under heavy load: a create the sandbox carried out
after the relay had given up on it, looked up too early and sent again. Creates in doubt now wait
``PARTNER__IN_DOUBT_SETTLE_S`` (``test_in_doubt.py`` holds that hard); the expected failure stays
so that any rarer cause is reported with what to replay rather than failing a build at random.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import random
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.partitioner import murmur2

from consumer.core.routing import load_routing
from consumer.core.state import DocStatus, DocumentRecord
from consumer.core.state_codec import decode_state
from tests.chaos.lsc import Place
from tests.chaos.run import ChaosRun, carry_out, partner_side
from tests.chaos.stream import chaos_stream
from tests.fixtures.relay import AgencySpec, RelayWorld, WorldFactory, uncommitted_records

pytestmark = pytest.mark.integration

SEED_VARIABLE = "CHOUETTE_RELAY_CHAOS_SEED"
PARTITIONS = 3
QUIET: Place = ("agence-est", "est-9")  # mapped, but LSC sends it nothing valid: orphans only
UNMAPPED: Place = ("agence-nord", "nord-9")  # not in the routing file: its documents are parked


def agencies() -> dict[str, AgencySpec]:
    return {
        "agence-nord": AgencySpec(
            buildings={"nord-1": "c-n1", "nord-2": "c-n2", "nord-3": "c-n3"},
            audiences=("building", "council"),
        ),
        "agence-sud": AgencySpec(
            buildings={"sud-1": "c-s1", "sud-2": "c-s2"}, modules=("ag", "contrats")
        ),
        "agence-est": AgencySpec(buildings={"est-1": "c-e1", "est-2": "c-e2", "est-9": "c-e9"}),
    }


def places(specs: dict[str, AgencySpec]) -> list[Place]:
    mapped = [(a, b) for a, spec in specs.items() for b in spec.buildings if (a, b) != QUIET]
    return [*mapped, UNMAPPED]


def partition_of(key: bytes) -> int:
    """The partition Kafka's default partitioner gives ``key`` (murmur2, as the Java client)."""
    hashed: int = murmur2(key)  # aiokafka is untyped
    return (hashed & 0x7FFFFFFF) % PARTITIONS


def chaos_seed() -> int:
    given = os.environ.get(SEED_VARIABLE, "").strip()
    return int(given) if given else random.SystemRandom().randrange(1 << 32)


def on_partner(world: RelayWorld) -> dict[tuple[str, str], str | None]:
    return {
        (d.condominium_id, d.reference): d.sha256
        for d in world.sandbox.documents()
        if d.reference is not None
    }


async def final_view(world: RelayWorld) -> dict[str, dict[str, Any]]:
    """The relay's compacted view as the state topic holds it: the last value of every key."""
    view: dict[str, dict[str, Any]] = {}
    for record in await world.read_topic(world.state_topic):
        key = record.key.decode()
        if record.value is None:
            view.pop(key, None)
            continue
        # Either form of a document record (JSON or compact), read as the relay reads it.
        decoded = decode_state(record.key, record.value)
        if isinstance(decoded, DocumentRecord):
            view[key] = {
                "kind": "document",
                "status": decoded.status,
                "condominium_id": decoded.condominium_id,
                "sha256": decoded.sha256,
                "parked_reason": decoded.parked_reason,
            }
        else:
            view[key] = {"kind": type(decoded).__name__}
    return view


def secrets_of(specs: dict[str, AgencySpec]) -> list[bytes]:
    """Every form an API key travels in: itself and its Basic authorization."""
    found = []
    for spec in specs.values():
        found.append(spec.api_key.encode())
        found.append(base64.b64encode(f"{spec.api_key}:".encode()))
    return found


async def test_a_mixed_stream_through_restarts_ends_with_exactly_lsc_truth(
    relay_world: WorldFactory, tmp_path: Path
) -> None:
    seed = chaos_seed()
    print(f"chaos seed {seed}; run it again with {SEED_VARIABLE}={seed}")
    began = time.monotonic()
    specs, now = agencies(), dt.datetime.now(dt.UTC)
    world = await relay_world(agencies=specs, partitions=PARTITIONS)
    stream = chaos_stream(
        seed,
        places=places(specs),
        quiet=QUIET,
        routing=load_routing(world.routing_file),
        serve=lambda name, data: world.store.add_bytes(name, data).url,
        partition_of=partition_of,
        start=now - dt.timedelta(hours=1),
        now=now,
    )
    print(f"chaos stream: {stream.summary()}")
    # A breaker that opens under the injected errors pauses its agency for a second, not thirty;
    # content the store does not serve is parked after three tries, half a second apart.
    partner = world.settings().partner.model_copy(update={"breaker_cooldown_s": 1.0})
    content = world.settings().content.model_copy(
        update={"unavailable_attempts": 3, "unavailable_backoff_s": 0.5}
    )
    run = ChaosRun(world, tmp_path / "relay.log", {"partner": partner, "content": content})

    await carry_out(run, stream, random.Random(seed))  # noqa: S311 - reproducible moments
    published = time.monotonic()
    await converged(world, stream.expected, seed)
    side = await partner_side(run, stream)
    expected = stream.expected | side.expected
    expected_parked = stream.parked | side.parked
    await converged(world, expected, seed)

    async def all_parked() -> bool:
        return _reasons(orjson.loads(await run.ops("/status"))["parked"]) == expected_parked

    await world.wait_until(all_parked, timeout=60, what=f"the parked documents (seed {seed})")
    await world.wait_until(
        lambda: _at_end(world), timeout=60, what=f"offsets committed to the end (seed {seed})"
    )
    done = time.monotonic()
    status_text = await run.ops("/status")
    status = orjson.loads(status_text)
    metrics = await run.ops("/metrics")
    await run.stop()
    print(
        f"chaos: stream published in {published - began:.1f} s, partner side and convergence "
        f"{done - published:.1f} s, {time.monotonic() - began:.1f} s in all; "
        f"the relay logged {run.notable()}"
    )

    # The partner: exactly the truth, every document created once.
    assert on_partner(world) == expected
    assert len(world.sandbox.documents()) == len(expected)
    creates = world.sandbox.state()["create_counts"]
    duplicates = {ref: n for ref, n in creates.items() if n != 1}  # judged last, see the end
    assert 'chouette_relay_circuit_open{agency="agence-sud"} 0.0' in metrics

    # The view: published what the partner holds (less the withdrawals it refused, parked),
    # parked what routing parks and what the partner or the store refused, with the reason.
    view = await final_view(world)
    documents = {k: v for k, v in view.items() if v.get("kind") == "document"}
    statuses = {v["status"] for v in documents.values()}
    assert statuses <= {DocStatus.PUBLISHED, DocStatus.PARKED, DocStatus.FILTERED}, statuses
    assert {
        (v["condominium_id"], k.split(":", 2)[2]): v["sha256"]
        for k, v in documents.items()
        if v["status"] == DocStatus.PUBLISHED
    } == {place: sha for place, sha in expected.items() if place not in side.kept}
    parked = [
        {"agency": a, "building": b, "document": d, "reason": v["parked_reason"]}
        for (a, b, d), v in ((tuple(k.split(":", 2)), v) for k, v in documents.items())
        if v["status"] == DocStatus.PARKED
    ]
    assert _reasons(parked) == expected_parked
    assert _reasons(status["parked"]) == expected_parked
    assert status["held"] == []

    # Dead letters: every bad record with its reason (at least once), no good record.
    letters: dict[tuple[str, int, int], set[str]] = {}
    for letter in await world.dead_letters():
        source = letter["source"]
        letters.setdefault((source["topic"], source["partition"], source["offset"]), set()).add(
            letter["reason"]
        )
    expected_letters = {
        where: {record.reason} for where, record in run.sent.items() if record.reason is not None
    }
    assert letters == expected_letters, {
        run.sent[where].what: (letters.get(where), expected_letters.get(where))
        for where in letters.keys() ^ expected_letters.keys()
        | {w for w in letters.keys() & expected_letters.keys() if letters[w] != expected_letters[w]}
    }

    # No API key anywhere the relay writes.
    written = {
        "log": run.log_path.read_bytes(),
        "/status": status_text.encode(),
        "dead letters": b"\n".join(
            r.value or b"" for r in await world.read_topic(world.dead_letter_topic)
        ),
        "state records": b"\n".join(
            (r.key or b"") + (r.value or b"") for r in await world.read_topic(world.state_topic)
        ),
    }
    for secret in secrets_of(specs):
        leaked = [where for where, data in written.items() if secret in data]
        assert leaked == [], f"an API key appears in {leaked}"

    entries = run.log_entries()
    assert entries[-1]["msg"] == "stopped cleanly"
    assert not [e for e in entries if "Traceback" in str(e.get("exc", ""))], "a traceback logged"

    assert not duplicates, (
        f"seed {seed}: created more than once on the partner {duplicates}; "
        f"the relay's log: {run.log_path}"
    )


async def converged(world: RelayWorld, expected: dict[tuple[str, str], str], seed: int) -> None:
    """Wait for the partner to hold ``expected``; say how it differs if it never does."""
    try:
        await world.wait_until(lambda: on_partner(world) == expected, timeout=120)
    except AssertionError as timeout:
        held = on_partner(world)
        differences = {
            place: (held.get(place), expected.get(place))
            for place in held.keys() | expected.keys()
            if held.get(place) != expected.get(place)
        }
        message = f"seed {seed}: partner (held, expected) differ: {differences}"
        raise AssertionError(message) from timeout


def _reasons(entries: list[dict[str, Any]]) -> dict[tuple[str, str, str], str]:
    """Parked entries by document, with the kind of their reason (before any detail)."""
    return {
        (e["agency"], e["building"], e["document"]): str(e["reason"]).split(":")[0] for e in entries
    }


async def _at_end(world: RelayWorld) -> bool:
    return await uncommitted_records(world) == 0
