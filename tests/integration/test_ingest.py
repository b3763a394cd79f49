"""Poison input goes to the dead-letter topic, byte for byte, and never holds valid events back.

Every kind of bad record LSC could publish is sent between valid events of the same building.
Each one must come out of the dead-letter topic with its machine-readable reason, its original
key, value and headers and where it was read; valid events around it must all reach the sandbox
in their building's order; committed offsets must move past it; and a restarted relay must
neither send nor dead-letter anything a second time.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families

from consumer.app.relay import Relay
from consumer.core.decoding import PoisonReason
from consumer.settings import KafkaSettings
from tests.fixtures.relay import AgencySpec, Json, RelayWorld, WorldFactory, ops_get

pytestmark = pytest.mark.integration

AGENCY = "agence-a"
BUILDING = "bat-1"
VERSIONED_BUILDING = "bat-2"
VERSIONED_ID = "lsc-ag-2025:pv-principal"
MANIFEST_BUILDING = "bat-3"
BUILDINGS = {BUILDING: "c-1", VERSIONED_BUILDING: "c-2", MANIFEST_BUILDING: "c-3"}
MAX_VALUE_BYTES = 4096
CASE_HEADER = "test-case"
DEAD_LETTERS_TOTAL = "chouette_relay_dead_letters_total"


@dataclass(frozen=True)
class PoisonCase:
    """One bad record as LSC could publish it, and why the relay must refuse it."""

    name: str
    reason: PoisonReason
    on_manifest_topic: bool
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    detail_mentions: str = ""


@dataclass
class Scenario:
    """What was published: the poison and the valid events around it."""

    cases: list[PoisonCase]
    documents: list[Json] = field(default_factory=list)
    versions: list[Json] = field(default_factory=list)
    listed: list[Json] = field(default_factory=list)


def _small_values(world: RelayWorld) -> KafkaSettings:
    """The world's Kafka settings with a value limit small enough to publish past it."""
    return world.settings().kafka.model_copy(update={"max_value_bytes": MAX_VALUE_BYTES})


def _poison_cases(world: RelayWorld) -> list[PoisonCase]:
    key = f"{AGENCY}:{BUILDING}".encode()
    doc_headers = [("event-type", b"document-created"), ("schema-version", b"1")]
    manifest_headers = [("event-type", b"manifest-snapshot"), ("schema-version", b"1")]

    def event(change: Callable[[Json], object] = lambda _: None) -> Json:
        body = world.document_created(AGENCY, BUILDING, world.document())
        change(body)
        return body

    def manifest(change: Callable[[Json], object] = lambda _: None) -> Json:
        body = world.manifest_parts(AGENCY, BUILDING, [world.document()])[0]
        change(body)
        return body

    def case(
        name: str,
        reason: PoisonReason,
        value: bytes | None,
        *,
        key: bytes | None = key,
        headers: list[tuple[str, bytes]] = doc_headers,
        manifest_topic: bool = False,
        mentions: str = "",
    ) -> PoisonCase:
        tagged = [*headers, (CASE_HEADER, name.encode())]
        return PoisonCase(name, reason, manifest_topic, key, value, tagged, mentions)

    def size_as_text(body: Json) -> None:
        body["document"]["content"]["size_bytes"] = "12 kB"

    def sha_in_capitals(body: Json) -> None:
        content = body["document"]["content"]
        content["sha256"] = content["sha256"].upper()

    oversized = orjson.dumps(event()) + b" " * MAX_VALUE_BYTES
    return [
        case("not-json", PoisonReason.NOT_JSON, b'{"schema_version": 1, "event_type": "docu'),
        case("latin-1", PoisonReason.NOT_UTF8, b'{"title": "Proc\xe8s-verbal d\'AG"}'),
        case("array", PoisonReason.NOT_AN_OBJECT, b'["document-created"]'),
        case(
            "size-as-text",
            PoisonReason.SCHEMA_VIOLATION,
            orjson.dumps(event(size_as_text)),
            mentions="document.content.size_bytes",
        ),
        case(
            "no-occurred-at",
            PoisonReason.SCHEMA_VIOLATION,
            orjson.dumps(event(lambda body: body.pop("occurred_at"))),
            mentions="occurred_at",
        ),
        case(
            "sha256-in-capitals",
            PoisonReason.SCHEMA_VIOLATION,
            orjson.dumps(event(sha_in_capitals)),
            mentions="document.content.sha256",
        ),
        case(
            "schema-version-2",
            PoisonReason.UNKNOWN_SCHEMA_VERSION,
            orjson.dumps(event(lambda body: body.update(schema_version=2))),
            headers=[("event-type", b"document-created"), ("schema-version", b"2")],
        ),
        case(
            "document-deleted",
            PoisonReason.UNKNOWN_EVENT_TYPE,
            orjson.dumps(event(lambda body: body.update(event_type="document-deleted"))),
            headers=[("event-type", b"document-deleted"), ("schema-version", b"1")],
        ),
        case(
            "key-of-another-building",
            PoisonReason.KEY_MISMATCH,
            orjson.dumps(event(lambda body: body.update(building_id="bat-9"))),
        ),
        case("no-key", PoisonReason.KEY_MISSING, orjson.dumps(event()), key=None),
        case("oversized", PoisonReason.OVERSIZED, oversized, mentions=str(MAX_VALUE_BYTES)),
        case("tombstone", PoisonReason.NULL_VALUE, None, headers=[]),
        case(
            "manifest-on-document-topic",
            PoisonReason.WRONG_TOPIC,
            orjson.dumps(manifest()),
            headers=manifest_headers,
        ),
        case(
            "event-type-header-says-manifest",
            PoisonReason.HEADER_MISMATCH,
            orjson.dumps(event()),
            headers=[("event-type", b"manifest-snapshot"), ("schema-version", b"1")],
        ),
        case(
            "part-3-of-2",
            PoisonReason.PART_OUT_OF_RANGE,
            orjson.dumps(manifest(lambda body: body.update(part=3, parts=2, item_count=2))),
            headers=manifest_headers,
            manifest_topic=True,
        ),
        case(
            "item-count-too-high",
            PoisonReason.ITEM_COUNT_MISMATCH,
            orjson.dumps(manifest(lambda body: body.update(item_count=5))),
            headers=manifest_headers,
            manifest_topic=True,
        ),
        case(
            "document-on-manifest-topic",
            PoisonReason.WRONG_TOPIC,
            orjson.dumps(event()),
            manifest_topic=True,
        ),
        case("manifest-tombstone", PoisonReason.NULL_VALUE, None, headers=[], manifest_topic=True),
    ]


async def _publish_scenario(world: RelayWorld) -> Scenario:
    """Each poison record between two valid documents of its building; a document of another
    building is changed every few records (same id, new content each time); the two parts of a
    third building's manifest have poison between them."""
    scenario = Scenario(_poison_cases(world))
    scenario.listed = [
        world.document(title=f"Diagnostic {n}", module="diagnostics") for n in (1, 2)
    ]
    first_part, second_part = world.manifest_parts(
        AGENCY, MANIFEST_BUILDING, scenario.listed, parts=2, taken_at=dt.datetime.now(dt.UTC)
    )
    await world.publish(first_part)
    start = dt.datetime.now(dt.UTC)
    for index, case in enumerate(scenario.cases):
        # occurred_at strictly increases, so that each event is newer than the one before it
        moment = start + dt.timedelta(milliseconds=10 * index)
        document = world.document(title=f"Contrat {index}", module="contrats")
        scenario.documents.append(document)
        await world.publish(world.document_created(AGENCY, BUILDING, document, occurred_at=moment))
        topic = world.manifests_topic if case.on_manifest_topic else world.documents_topic
        await world.publish_raw(topic, key=case.key, value=case.value, headers=case.headers)
        if index % 3 == 0:
            version = world.document(doc_id=VERSIONED_ID, title=f"PV principal v{index}")
            scenario.versions.append(version)
            await world.publish(
                world.document_created(AGENCY, VERSIONED_BUILDING, version, occurred_at=moment)
            )
    last = world.document(title="Contrat final", module="contrats")
    scenario.documents.append(last)
    await world.publish(world.document_created(AGENCY, BUILDING, last), second_part)
    return scenario


def _dead_lettered(relay: Relay) -> float:
    return sum(
        sample.value
        for metric in relay.registry.collect()
        for sample in metric.samples
        if sample.name == DEAD_LETTERS_TOTAL
    )


def _delivered(world: RelayWorld, scenario: Scenario) -> bool:
    last_version = scenario.versions[-1]["content"]["sha256"]
    return (
        world.partner_references("c-1").keys() >= {d["id"] for d in scenario.documents}
        and world.partner_references("c-2").get(VERSIONED_ID) == last_version
        and world.partner_references("c-3").keys() >= {d["id"] for d in scenario.listed}
    )


async def _settled(world: RelayWorld, relay: Relay, scenario: Scenario) -> None:
    await world.wait_until(
        lambda: _delivered(world, scenario), what="every valid document in the sandbox"
    )
    await world.wait_until(
        lambda: _dead_lettered(relay) >= len(scenario.cases), what="every poison dead-lettered"
    )


def _header(headers: Any, name: str) -> bytes | None:
    return next((value for key, value in headers if key == name), None)


async def _scrape_dead_letters(relay: Relay) -> Counter[str]:
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(await ops_get(relay, "/metrics")):
        for sample in family.samples:
            if sample.name == DEAD_LETTERS_TOTAL and sample.value:
                counts[sample.labels["reason"]] += int(sample.value)
    return counts


async def _end_offsets(world: RelayWorld) -> dict[TopicPartition, int]:
    reader = AIOKafkaConsumer(bootstrap_servers=world.bootstrap, enable_auto_commit=False)
    await reader.start()
    try:
        await reader.topics()
        tps = [
            TopicPartition(topic, partition)
            for topic in (world.documents_topic, world.manifests_topic)
            for partition in sorted(reader.partitions_for_topic(topic) or ())
        ]
        ends: dict[TopicPartition, int] = await reader.end_offsets(tps)
        return ends
    finally:
        await reader.stop()


async def _wait_for_commits_at_end(world: RelayWorld) -> dict[TopicPartition, int]:
    """Wait until the group's committed offsets reach the end of every non-empty partition."""
    ends = await _end_offsets(world)
    admin = AIOKafkaAdminClient(bootstrap_servers=world.bootstrap)
    await admin.start()
    committed: dict[TopicPartition, int] = {}
    try:

        async def at_end() -> bool:
            found = await admin.list_consumer_group_offsets(world.group_id)
            committed.clear()
            committed.update({tp: meta.offset for tp, meta in found.items() if meta.offset >= 0})
            return all(committed.get(tp, 0) == end for tp, end in ends.items())

        await world.wait_until(at_end, what="committed offsets at the end of both topics")
    finally:
        await admin.close()
    assert sum(ends.values()) > 0
    return committed


async def test_each_kind_of_poison_is_dead_lettered_as_read_and_valid_events_still_flow(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings=BUILDINGS)})
    relay = await world.start_relay(kafka=_small_values(world))

    scenario = await _publish_scenario(world)
    await _settled(world, relay, scenario)

    # Every poison record is in the dead-letter topic once, as it was read.
    inputs = {
        case_name.decode(): record
        for topic in (world.documents_topic, world.manifests_topic)
        for record in await world.read_topic(topic)
        if (case_name := _header(record.headers, CASE_HEADER)) is not None
    }
    dead_letters = await world.read_topic(world.dead_letter_topic)
    by_case = {
        base64.b64decode(header["value_base64"]).decode(): (record, envelope)
        for record in dead_letters
        for envelope in [orjson.loads(record.value)]
        for header in envelope["record"]["headers"]
        if header["key"] == CASE_HEADER
    }
    assert len(dead_letters) == len(scenario.cases)
    assert sorted(by_case) == sorted(case.name for case in scenario.cases)
    for case in scenario.cases:
        record, envelope = by_case[case.name]
        original = inputs[case.name]
        kept = envelope["record"]
        assert envelope["reason"] == case.reason.value, case.name
        assert case.detail_mentions in envelope["detail"], case.name
        assert envelope["source"] == {
            "topic": original.topic,
            "partition": original.partition,
            "offset": original.offset,
            "timestamp_ms": original.timestamp,
        }, case.name
        expected_topic = world.manifests_topic if case.on_manifest_topic else world.documents_topic
        assert original.topic == expected_topic
        assert _decode(kept["key_base64"]) == case.key, case.name
        assert _decode(kept["value_base64"]) == case.value, case.name
        assert [(h["key"], _decode(h["value_base64"])) for h in kept["headers"]] == case.headers
        assert record.key == case.key, case.name
        assert _header(record.headers, "dead-letter-reason") == case.reason.value.encode()

    # The counter says the same, by reason.
    expected = Counter(case.reason.value for case in scenario.cases)
    assert await _scrape_dead_letters(relay) == expected

    # No valid event was lost, and the versioned document ends at its last version.
    references = world.partner_references("c-1")
    assert references == {d["id"]: d["content"]["sha256"] for d in scenario.documents}
    assert all(world.sandbox.create_count(d["id"]) == 1 for d in scenario.documents)
    await world.wait_until(
        lambda: all(p["pending_operations"] == 0 for p in relay.status()["partitions"].values()),
        what="no partner operation in flight",
    )
    held = world.sandbox.documents("c-2")
    last = scenario.versions[-1]
    assert [(d.reference, d.title, d.sha256) for d in held] == [
        (VERSIONED_ID, last["title"], last["content"]["sha256"])
    ]
    assert world.sandbox.create_count(VERSIONED_ID) == 1
    assert world.partner_references("c-3") == {
        d["id"]: d["content"]["sha256"] for d in scenario.listed
    }
    uploads = relay.registry.get_sample_value(
        "chouette_relay_events_total", {"kind": "document-created", "outcome": "upload"}
    )
    assert uploads == len(scenario.documents) + len(scenario.versions)


async def test_poison_does_not_block_commits_and_a_restart_repeats_nothing(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings=BUILDINGS)})
    kafka = _small_values(world)
    first = await world.start_relay(kafka=kafka)
    scenario = await _publish_scenario(world)
    await _settled(world, first, scenario)

    # Poison is done as soon as it is dead-lettered: the group commits past all of it.
    await _wait_for_commits_at_end(world)

    creates = dict(world.sandbox.state()["create_counts"])
    writes = {m: world.sandbox.request_count(method=m) for m in ("POST", "PATCH", "DELETE")}
    await world.stop_relay(first)
    second = await world.start_relay(kafka=kafka)

    # One more valid document and one more poison record tell when the new relay is caught up.
    sentinel = world.document(title="Contrat après redémarrage", module="contrats")
    await world.publish(world.document_created(AGENCY, BUILDING, sentinel))
    await world.publish_raw(
        world.documents_topic, key=f"{AGENCY}:{BUILDING}".encode(), value=b"not json"
    )
    await world.wait_until(
        lambda: sentinel["id"] in world.partner_references("c-1"), what="the sentinel upload"
    )
    await world.wait_until(lambda: _dead_lettered(second) >= 1, what="the sentinel poison")
    await _wait_for_commits_at_end(world)

    # The new relay read only the two new records ...
    assert await _scrape_dead_letters(second) == Counter({PoisonReason.NOT_JSON.value: 1})
    read = sum(
        sample.value
        for metric in second.registry.collect()
        for sample in metric.samples
        if sample.name == "chouette_relay_events_total"
    )
    assert read == 2
    # ... so nothing was sent twice ...
    assert world.sandbox.state()["create_counts"] == {**creates, sentinel["id"]: 1}
    assert world.sandbox.duplicated_references() == {}
    assert world.sandbox.request_count(method="POST") == writes["POST"] + 1
    assert world.sandbox.request_count(method="PATCH") == writes["PATCH"]
    assert world.sandbox.request_count(method="DELETE") == writes["DELETE"] == 0
    # ... and no record is in the dead-letter topic twice.
    sources = [
        (e["source"]["topic"], e["source"]["partition"], e["source"]["offset"])
        for e in await world.dead_letters()
    ]
    assert len(sources) == len(scenario.cases) + 1
    assert len(set(sources)) == len(sources)


async def test_a_record_far_over_the_value_limit_is_dead_lettered_too(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings=BUILDINGS)})
    await world.start_relay(kafka=_small_values(world))
    relay_task = world.relays[-1][1]
    key = f"{AGENCY}:{BUILDING}".encode()
    # Well within what the input topic accepts (1 MB), but 25 times the relay's value limit.
    huge = orjson.dumps(world.document_created(AGENCY, BUILDING, world.document()))
    huge += b" " * (25 * MAX_VALUE_BYTES)
    after = world.document(title="Contrat suivant", module="contrats")

    await world.publish_raw(world.documents_topic, key=key, value=huge)
    await world.publish(world.document_created(AGENCY, BUILDING, after))

    await world.wait_until(
        lambda: relay_task.done() or after["id"] in world.partner_references("c-1"),
        what="the document after the oversized record, or the relay stopping",
    )
    assert not relay_task.done(), "the relay stopped on an oversized record"
    (dead_letter,) = await world.dead_letters()
    assert dead_letter["reason"] == PoisonReason.OVERSIZED.value
    # Too large for the dead-letter topic too: the envelope says where the original stays.
    assert dead_letter["record"]["value_base64"] is None
    assert _decode(dead_letter["record"]["key_base64"]) == key
    assert hashlib.sha256(huge).hexdigest() in dead_letter["detail"]
    assert f"at offset {dead_letter['source']['offset']}" in dead_letter["detail"]


def _decode(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)
