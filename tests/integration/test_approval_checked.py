"""An approve is checked by the replica that carries it out, against the plan it computes then.

The command line compares an approval with the current dry run before it writes it, but a record
on the commands topic may be stale (written before a later manifest changed the plan), replayed,
or written by an older command line. Each owning replica computes its own share of the plan from
its view and the manifests waiting in its partition, and refuses an approve whose share differs,
or that carries no shares to check: nothing is sent, the first publication keeps waiting, and the
refusal is counted and shown. The current plan, approved, starts it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson
import pytest

from consumer.app.relay import Relay
from tests.fixtures.relay import AgencySpec, Json, RelayWorld, WorldFactory
from tests.integration.operator_helpers import cli, token_http

pytestmark = pytest.mark.integration

NEW = "agence-neuve"


def _references(documents: list[Json]) -> dict[str, str]:
    return {d["id"]: d["content"]["sha256"] for d in documents}


def _counted(relay: Relay, kind: str, outcome: str) -> float:
    labels = {"kind": kind, "outcome": outcome}
    return relay.registry.get_sample_value("chouette_relay_commands_total", labels) or 0.0


def _manifests_awaiting(relay: Relay) -> float:
    return sum(
        sample.value
        for family in relay.metrics.events.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
        and sample.labels == {"kind": "manifest-snapshot", "outcome": "awaiting_approval"}
    )


def _commands_read(relay: Relay) -> float:
    return sum(
        sample.value
        for family in relay.metrics.events.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["kind"] == "operator-command"
    )


async def _approve(world: RelayWorld, plan: str, shares: list[str] | None) -> None:
    """An approve written straight to every partition of the commands topic, as any producer
    with write rights could (``shares`` None: as an older command line wrote it)."""
    body: dict[str, Any] = {
        "schema_version": 1,
        "command": "approve",
        "agency_id": NEW,
        "plan": plan,
        "requested_at": dt.datetime.now(dt.UTC).isoformat(),
        "requested_by": "stale",
    }
    if shares is not None:
        body["plan_shares"] = shares
    producer = await world.producer()
    for partition in sorted(await producer.partitions_for(world.commands_topic)):
        await producer.send_and_wait(
            world.commands_topic, key=NEW.encode(), value=orjson.dumps(body), partition=partition
        )


async def test_a_stale_approve_on_the_topic_is_refused_and_nothing_is_sent(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(
        agencies={NEW: AgencySpec(buildings={"bat-1": "c-1"}, approval="operator")}
    )
    relay = await world.start_relay(http=token_http(world.tmp))
    first = [world.document() for _ in range(4)]
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    await world.publish(*world.manifest_parts(NEW, "bat-1", first, taken_at=taken_at))
    await world.wait_until(lambda: _manifests_awaiting(relay) == 1, what="bat-1 waiting")
    shown = await cli(world, "plan", "--agency", NEW, "--json")
    stale_plan = shown["fingerprints"][NEW]

    # A later manifest changes the plan: one document replaced, one more listed.
    second = [*first[:3], world.document(), world.document()]
    later = taken_at + dt.timedelta(minutes=30)
    await world.publish(*world.manifest_parts(NEW, "bat-1", second, taken_at=later))
    await world.wait_until(lambda: _manifests_awaiting(relay) == 2, what="the newer manifest")

    # As an older command line wrote it: a fingerprint and no shares.
    await _approve(world, stale_plan, None)
    await world.wait_until(lambda: _commands_read(relay) == 3, what="the approve read")

    assert relay.status()["awaiting_approval"] == {NEW: ["bat-1"]}
    assert _counted(relay, "approve", "plan_unchecked") == 3
    # With the shares of the plan shown before the newer manifest: one per partition.
    stale_shares = shown["shares"][NEW]
    assert len(stale_shares) == 3
    await _approve(world, stale_plan, stale_shares)
    await world.wait_until(
        lambda: (
            _counted(relay, "approve", "plan_changed") == 1
            and _counted(relay, "approve", "carried_out") == 2
        ),
        what="bat-1's partition refusing, the two others (nothing waits there) carrying it out",
    )

    assert world.sandbox.documents("c-1") == []  # nothing sent
    assert relay.status()["awaiting_approval"] == {NEW: ["bat-1"]}
    refused: list[dict[str, Any]] = relay.status()["refused_commands"]["newest"]
    assert [entry["reason"] for entry in refused][:1] == ["plan_changed"]
    assert {entry["requested_by"] for entry in refused} == {"stale"}

    current = await cli(world, "plan", "--agency", NEW, "--json")
    assert current["fingerprints"][NEW] != stale_plan
    await cli(world, "approve", NEW, "--plan", current["fingerprints"][NEW])

    await world.wait_until(
        lambda: world.partner_references("c-1") == _references(second), what="the current plan"
    )
    assert _counted(relay, "approve", "carried_out") == 5
    assert world.sandbox.duplicated_references() == {}
