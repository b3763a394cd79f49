"""A backfill-only pause: nothing of the first publication reaches the partner, not even a lookup.

An upload intent of the paused first publication, left by a relay that stopped mid-upload, is
not looked up when the relay starts again (a lookup is a request the partner serves all the
same): the first publication's requests, lookups included, wait for the resume while the
agency's live documents go. Once resumed, each document is looked up before it is sent, and
is on the partner once.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from consumer.core.events import Module
from consumer.core.state import DocKey, DocStatus, DocumentRecord
from consumer.core.state_codec import encode_state
from tests.fixtures.relay import AgencySpec, Json, RelayWorld, WorldFactory
from tests.integration.operator_helpers import cli, token_http

pytestmark = pytest.mark.integration

AGENCY = "agence-a"


def _references(documents: list[Json]) -> dict[str, str]:
    return {d["id"]: d["content"]["sha256"] for d in documents}


def _requests_about(world: RelayWorld, documents: list[Json]) -> list[dict[str, Any]]:
    """The partner requests whose path or query names one of ``documents`` or their
    condominium (c-2)."""
    names = [d["id"].split(":", 1)[0] for d in documents]
    recent: list[dict[str, Any]] = world.sandbox.state()["recent_requests"]
    return [r for r in recent if "c-2" in r["path"] or any(n in r["path"] for n in names)]


async def _intent_left_behind(world: RelayWorld, document: Json, seen_at: dt.datetime) -> None:
    """The state record a relay writes before uploading ``document``, and never settled."""
    intent = DocumentRecord(
        key=DocKey(AGENCY, "bat-2", document["id"]),
        status=DocStatus.UPLOADING,
        sha256=document["content"]["sha256"],
        module=Module(document["module"]),
        seen_at=seen_at,
        document_date=dt.date.fromisoformat(document["document_date"]),
        size_bytes=document["content"]["size_bytes"],
        condominium_id="c-2",
    )
    key, value = encode_state(intent)
    await world.publish_raw(world.state_topic, key=key, value=value)


async def test_a_paused_first_publication_sends_no_lookup_across_a_restart_while_live_flows(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(
        agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1", "bat-2": "c-2"})}, partitions=1
    )
    http = token_http(world.tmp)
    relay = await world.start_relay(http=http)
    await cli(world, "pause", AGENCY, "--backfill-only")
    await world.wait_until(
        lambda: relay.status()["backfill_paused"] == [AGENCY], what="the backfill-only pause"
    )
    await world.stop_relay(relay)

    # The building's first publication, and an upload of it left in doubt by a stopped relay.
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    listed = [world.document() for _ in range(5)]
    await world.publish(*world.manifest_parts(AGENCY, "bat-2", listed, taken_at=taken_at))
    await _intent_left_behind(world, listed[0], taken_at)

    relay = await world.start_relay(http=http)
    live = world.document()
    await world.publish(world.document_created(AGENCY, "bat-1", live))
    await world.wait_until(
        lambda: world.partner_references("c-1") == _references([live]),
        timeout=60,
        what="the live document",
    )

    assert _requests_about(world, listed) == []
    assert world.partner_references("c-2") == {}

    assert (await cli(world, "resume", AGENCY))["queued"] == "resume"
    await world.wait_until(
        lambda: world.partner_references("c-2") == _references(listed),
        timeout=60,
        what="the first publication finished",
    )
    assert [world.sandbox.create_count(d["id"]) for d in [live, *listed]] == [1] * 6
    # The document left in doubt was looked up before it was sent.
    name = listed[0]["id"].split(":", 1)[0]
    assert any(r["method"] == "GET" and name in r["path"] for r in _requests_about(world, listed))
