"""No single record, and no producer's mistake about one building, stops the relay or holds
another building back.

Each test publishes, on the real broker, a record LSC could get wrong (a URL no HTTP client can
fetch, a time in the future, a snapshot id reused by another building, a part whose siblings never
come, a snapshot too large to assemble) between valid events. The record must end as a dead letter
or be dropped with a trace, the valid events around it must reach the sandbox, the relay must keep
running, and the committed offsets must move past it.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from consumer.app.relay import Relay
from consumer.settings import ManifestSettings
from tests.fixtures.relay import AgencySpec, Json, RelayWorld, WorldFactory

pytestmark = pytest.mark.integration

AGENCY = "agence-a"
BUILDINGS = {"bat-1": "c-1", "bat-2": "c-2", "bat-3": "c-3"}
DOC_HEADERS = [("event-type", b"document-created"), ("schema-version", b"1")]
MANIFEST_HEADERS = [("event-type", b"manifest-snapshot"), ("schema-version", b"1")]
UNFETCHABLE_URLS = [
    "https://documents.lsc.example:70000/1.pdf",
    "https://documents..lsc.example/1.pdf",
    "https://documents.lsc.example/1%2G.pdf",
    "https://relay:secret@documents.lsc.example/1.pdf",
    "https://[2001:db8::1/1.pdf",
    "https://xn--zz.lsc.example/1.pdf",
    "https://documents.lsc.example/pv 2024.pdf",
    "https://documents_1.lsc.example/1.pdf",
]


def _key(building: str) -> bytes:
    return f"{AGENCY}:{building}".encode()


def _with_url(document: Json, url: str) -> Json:
    return {**document, "content": {**document["content"], "url": url}}


async def _committed(world: RelayWorld) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=world.bootstrap)
    await admin.start()
    try:
        found = await admin.list_consumer_group_offsets(world.group_id)
        return {tp: meta.offset for tp, meta in found.items() if meta.offset >= 0}
    finally:
        await admin.close()


async def _wait_for_commits_at_end(world: RelayWorld) -> None:
    """Every record published so far on the input topics is committed."""
    records = [
        record
        for topic in (world.documents_topic, world.manifests_topic)
        for record in await world.read_topic(topic)
    ]
    ends: dict[TopicPartition, int] = {}
    for record in records:
        tp = TopicPartition(record.topic, record.partition)
        ends[tp] = max(ends.get(tp, 0), record.offset + 1)

    async def at_end() -> bool:
        committed = await _committed(world)
        return all(committed.get(tp, 0) >= end for tp, end in ends.items())

    await world.wait_until(at_end, what="committed offsets past every record published")


async def _running_until(world: RelayWorld, relay: Relay, condition: Any, what: str) -> None:
    """Wait for ``condition``, failing at once if the relay stops instead."""
    task = next(task for r, task in world.relays if r is relay)
    await world.wait_until(lambda: task.done() or condition(), what=what)
    assert not task.done(), f"the relay stopped: {relay.failure!r}"


def _dead_letter_count(relay: Relay, reason: str) -> float:
    value = relay.registry.get_sample_value(
        "chouette_relay_dead_letters_total", {"agency": AGENCY, "reason": reason}
    )
    return value or 0.0


async def test_a_url_no_http_client_can_fetch_is_a_dead_letter_and_the_relay_keeps_going(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings=BUILDINGS)}, partitions=1)
    relay = await world.start_relay()
    for url in UNFETCHABLE_URLS:
        event = world.document_created(AGENCY, "bat-1", _with_url(world.document(), url))
        await world.publish_raw(
            world.documents_topic, key=_key("bat-1"), value=orjson.dumps(event), headers=DOC_HEADERS
        )
    # A manifest with one such item among good ones is refused whole, and says so; the part
    # already read is let go at once rather than holding the commit until the expiry.
    listed = [world.document(module="diagnostics") for _ in range(3)]
    bad = _with_url(world.document(module="diagnostics"), UNFETCHABLE_URLS[0])
    good_part, bad_part = world.manifest_parts(AGENCY, "bat-2", [*listed, bad], parts=2)
    for part in (good_part, bad_part):
        await world.publish_raw(
            world.manifests_topic,
            key=_key("bat-2"),
            value=orjson.dumps(part),
            headers=MANIFEST_HEADERS,
        )
    after = world.document(module="contrats")
    await world.publish(world.document_created(AGENCY, "bat-1", after))

    await _running_until(
        world,
        relay,
        lambda: after["id"] in world.partner_references("c-1"),
        "the document published after the bad URLs",
    )
    await _wait_for_commits_at_end(world)
    dead_letters = await world.dead_letters()
    assert [d["reason"] for d in dead_letters] == ["bad_url"] * (len(UNFETCHABLE_URLS) + 1)
    manifest_letter = next(d for d in dead_letters if d["source"]["topic"] == world.manifests_topic)
    assert manifest_letter["detail"].startswith("items[1].content.url: ")  # of the second part
    assert all("secret" not in d["detail"] for d in dead_letters)
    assert _dead_letter_count(relay, "bad_url") == len(UNFETCHABLE_URLS) + 1
    assert world.partner_references("c-2") == {}  # nothing of the refused manifest was acted on
    abandoned = relay.registry.get_sample_value(
        "chouette_relay_manifests_total", {"outcome": "abandoned"}
    )
    assert abandoned == 1
    assert relay.failure is None


async def test_events_from_the_future_are_dead_letters_and_do_not_silence_their_building(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings=BUILDINGS)}, partitions=1)
    relay = await world.start_relay()
    now = dt.datetime.now(dt.UTC)
    tomorrow = now + dt.timedelta(days=1)
    await world.publish(*world.manifest_parts(AGENCY, "bat-1", [], taken_at=tomorrow))
    await world.publish(
        world.document_created(AGENCY, "bat-1", world.document(), occurred_at=tomorrow)
    )

    # Later events of the building are judged as if neither had been published.
    first = world.document()
    await world.publish(world.document_created(AGENCY, "bat-1", first, occurred_at=now))
    await _running_until(
        world, relay, lambda: first["id"] in world.partner_references("c-1"), "the next document"
    )
    second = world.document()
    later = now + dt.timedelta(seconds=1)
    await world.publish(*world.manifest_parts(AGENCY, "bat-1", [second], taken_at=later))
    await _running_until(
        world,
        relay,
        lambda: world.partner_references("c-1").keys() == {second["id"]},
        "the next manifest applied: its document sent, the one it no longer lists withdrawn",
    )
    await _wait_for_commits_at_end(world)
    assert sorted(d["reason"] for d in await world.dead_letters()) == [
        "occurred_at_in_future",
        "taken_at_in_future",
    ]


async def test_one_snapshot_id_used_by_two_buildings_costs_neither_its_manifest(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings=BUILDINGS)}, partitions=1)
    relay = await world.start_relay()
    listed = {building: [world.document(), world.document()] for building in ("bat-1", "bat-2")}
    parts = {
        building: world.manifest_parts(AGENCY, building, items, parts=2)
        for building, items in listed.items()
    }
    shared = str(uuid.uuid4())
    for building_parts in parts.values():
        for part in building_parts:
            part["snapshot_id"] = shared
    # Interleaved on the one partition: bat-1 part 1, bat-2 part 1, bat-1 part 2, bat-2 part 2.
    for a, b in zip(parts["bat-1"], parts["bat-2"], strict=True):
        await world.publish(a, b)

    def both_sent() -> bool:
        return all(
            world.partner_references(BUILDINGS[building]).keys() == {d["id"] for d in items}
            for building, items in listed.items()
        )

    await _running_until(world, relay, both_sent, "both buildings' manifests applied")
    await _wait_for_commits_at_end(world)
    assert await world.dead_letters() == []


async def test_an_orphan_part_releases_the_manifest_offsets_after_the_expiry_across_restarts(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings=BUILDINGS)}, partitions=1)
    first = await world.start_relay(manifest=ManifestSettings(expiry_s=86_400))
    two_hours_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    orphan, _never_sent = world.manifest_parts(
        AGENCY, "bat-1", [world.document(), world.document()], parts=2, taken_at=two_hours_ago
    )
    producer = await world.producer()
    await producer.send_and_wait(
        world.manifests_topic,
        value=orjson.dumps(orphan),
        key=_key("bat-1"),
        headers=MANIFEST_HEADERS,
        timestamp_ms=int(two_hours_ago.timestamp() * 1000),
    )
    # A complete manifest of another module after it: applied, but the orphan holds the commit.
    sentinel = world.document(module="contrats")
    await world.publish(*world.manifest_parts(AGENCY, "bat-1", [sentinel], modules=["contrats"]))
    await _running_until(
        world, first, lambda: sentinel["id"] in world.partner_references("c-1"), "the sentinel"
    )
    manifests = TopicPartition(world.manifests_topic, 0)

    async def held_at_orphan() -> bool:
        return (await _committed(world)).get(manifests) == 0

    await world.wait_until(held_at_orphan, what="the orphan's offset committed as unfinished")
    await world.stop_relay(first)

    # An hour's expiry counts from when the orphan was published, not from this restart.
    second = await world.start_relay(manifest=ManifestSettings(expiry_s=3600))
    await _wait_for_commits_at_end(world)
    expired = second.registry.get_sample_value(
        "chouette_relay_manifests_total", {"outcome": "expired"}
    )
    assert expired == 1
    assert world.sandbox.request_count(method="DELETE") == 0
    assert world.partner_references("c-1").keys() == {sentinel["id"]}


async def test_a_snapshot_too_large_to_assemble_is_a_dead_letter_and_evicts_no_other_building(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(
        agencies={AGENCY: AgencySpec(buildings=BUILDINGS)},
        partitions=1,
        manifest=ManifestSettings(expiry_s=600, max_pending_items=3),
    )
    relay = await world.start_relay()
    waiting = [world.document(), world.document()]
    first_part, second_part = world.manifest_parts(AGENCY, "bat-1", waiting, parts=2)
    await world.publish(first_part)
    huge = world.manifest_parts(AGENCY, "bat-2", [world.document() for _ in range(6)], parts=2)
    await world.publish(*huge)
    # The same part number again with other items: which one LSC meant is unknown.
    conflicting = world.manifest_parts(
        AGENCY, "bat-3", [world.document(), world.document()], parts=2
    )
    again = {**conflicting[0], "items": [world.document()]}
    await world.publish(conflicting[0], again)
    await world.publish(second_part)

    await _running_until(
        world,
        relay,
        lambda: world.partner_references("c-1").keys() == {d["id"] for d in waiting},
        "the waiting building's manifest applied",
    )
    await _wait_for_commits_at_end(world)
    letters = await world.dead_letters()
    assert sorted(d["reason"] for d in letters) == [
        "inconsistent_parts",
        "manifest_too_large",
        "manifest_too_large",
    ]
    assert world.partner_references("c-2") == {}
    assert world.partner_references("c-3") == {}
