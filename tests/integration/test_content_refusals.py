"""Documents the relay must not send: refused with their cause, while the rest keeps flowing.

Content that is not what the event declared (checksum, size), too large, off the allowlist,
missing from the store or not decodable is dead-lettered with the specific cause, and the other
documents of the same building are delivered and their offsets committed. A document the partner
refuses for bad credentials is parked for an operator, not dead-lettered. Through all of it the
agencies' API keys appear nowhere an operator or another system could read them.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from consumer.app.relay import Relay
from consumer.core.state import DocStatus, DocumentRecord
from consumer.core.state_codec import decode_state
from consumer.local.pdf import make_pdf
from consumer.ops.logs import JsonFormatter
from consumer.settings import ContentSettings
from tests.fixtures.relay import (
    AgencySpec,
    Json,
    RelayWorld,
    WorldFactory,
    metric,
    ops_get,
    uncommitted_records,
)

pytestmark = pytest.mark.integration

AGENCY = "agence-a"
MAX_BYTES = 2048  # the test PDFs are under 1 KiB


async def wait_until_committed(world: RelayWorld) -> None:
    async def committed() -> bool:
        return await uncommitted_records(world) == 0

    await world.wait_until(committed, timeout=20, what="every input offset committed", interval=0.5)


async def wait_for_dead_letters(world: RelayWorld, count: int) -> list[Json]:
    found: list[Json] = []

    async def arrived() -> bool:
        found[:] = await world.dead_letters()
        return len(found) >= count

    await world.wait_until(arrived, timeout=20, what=f"{count} dead letters", interval=0.3)
    return found


def statuses(relay: Relay) -> dict[str, int]:
    """Documents in the relay's view by status, over every partition (zeros left out)."""
    total: dict[str, int] = {}
    for partition in relay.status()["partitions"].values():
        for status, count in partition["by_status"].items():
            total[status] = total.get(status, 0) + count
    return {status: n for status, n in total.items() if n}


def store_name(document: Json) -> str:
    url: str = document["content"]["url"]
    return url.rsplit("/", 1)[1].removesuffix(".pdf")


def with_content(document: Json, **content: object) -> Json:
    return {**document, "content": {**document["content"], **content}}


def inline(document: Json, data: bytes, *, declared: bytes | None = None) -> Json:
    """``document`` carrying ``data`` inline, declaring the checks of ``declared`` (or data)."""
    declared = data if declared is None else declared
    return {
        **document,
        "content": {
            "media_type": "application/pdf",
            "size_bytes": len(declared),
            "sha256": hashlib.sha256(declared).hexdigest(),
            "inline_base64": base64.b64encode(data).decode(),
        },
    }


# -- content refusals ------------------------------------------------------------------------


async def test_refused_content_is_dead_lettered_with_its_cause_and_the_building_carries_on(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    store = world.store
    relay = await world.start_relay(
        content=ContentSettings(allowed_hosts=(f"{store.host}:{store.port}",), max_bytes=MAX_BYTES)
    )
    big = make_pdf("Carnet complet", lines=[f"ligne {n} " + "x" * 60 for n in range(60)])
    assert len(big) > MAX_BYTES

    first = world.document(title="PV AG 2024")
    wrong_sha = with_content(world.document(), sha256=hashlib.sha256(b"other").hexdigest())
    wrong_size = world.document()
    wrong_size = with_content(wrong_size, size_bytes=wrong_size["content"]["size_bytes"] - 1)
    declared_too_large = world.document()
    stored = store.add_bytes(store_name(declared_too_large), big)
    declared_too_large = with_content(
        declared_too_large, size_bytes=stored.size, sha256=stored.sha256
    )
    body_too_large = world.document()  # declares its small size, serves a big body
    store.add_bytes(store_name(body_too_large), big)
    off_allowlist = world.document()
    off_allowlist = with_content(
        off_allowlist, url=off_allowlist["content"]["url"].replace("127.0.0.1", "localhost")
    )
    missing = world.document()
    store.remove(store_name(missing))
    bad_base64 = world.document(inline=True)
    bad_base64 = with_content(bad_base64, inline_base64="JVBERi0x=LjQK")
    inline_not_declared = inline(world.document(), make_pdf("A"), declared=make_pdf("B"))
    last_by_url = world.document(title="Contrat ascenseur")
    last_inline = world.document(title="Diagnostic amiante", inline=True)
    refused = {
        wrong_sha["id"]: "sha256_mismatch",
        declared_too_large["id"]: "too_large",
        body_too_large["id"]: "too_large",
        off_allowlist["id"]: "host_not_allowed",
        missing["id"]: "not_found",
        wrong_size["id"]: "size_mismatch",
        inline_not_declared["id"]: "sha256_mismatch",
    }
    delivered = [first, last_by_url, last_inline]
    in_order = [
        first,
        wrong_sha,
        wrong_size,
        declared_too_large,
        body_too_large,
        off_allowlist,
        missing,
        bad_base64,
        inline_not_declared,
        last_by_url,
        last_inline,
    ]
    events = [world.document_created(AGENCY, "bat-1", document) for document in in_order]

    await world.publish(*events)

    letters = await wait_for_dead_letters(world, len(refused) + 1)
    await world.wait_until(
        lambda: len(world.partner_references("c-1")) == len(delivered), what="the good documents"
    )
    await wait_until_committed(world)
    letters = await world.dead_letters()  # all of them: none is sent twice

    assert len(letters) == len(refused) + 1
    by_document: dict[str, Json] = {}
    for letter in letters:
        original = orjson.loads(base64.b64decode(letter["record"]["value_base64"]))
        assert original in events  # the original bytes, as LSC sent them
        assert letter["source"]["topic"] == world.documents_topic
        assert letter["source"]["offset"] == events.index(original)  # one partition, in order
        by_document[original["document"]["id"]] = letter
    assert set(by_document) == {*refused, bad_base64["id"]}
    for document_id, cause in refused.items():
        letter = by_document[document_id]
        assert letter["reason"] == "content_rejected"
        assert letter["detail"].startswith(f"document {document_id}: {cause}: "), letter["detail"]
    # Base64 that cannot decode is refused by the event contract before any fetching.
    undecodable = by_document[bad_base64["id"]]
    assert undecodable["reason"] == "schema_violation"
    assert "inline_base64" in undecodable["detail"]

    assert world.partner_references("c-1") == {d["id"]: d["content"]["sha256"] for d in delivered}
    assert statuses(relay) == {"published": len(delivered)}
    assert store.request_count(store_name(off_allowlist)) == 0  # never contacted
    assert store.request_count(store_name(declared_too_large)) == 0  # never downloaded
    assert store.request_count(store_name(body_too_large)) == 1
    rejected = await metric(
        relay, "chouette_relay_dead_letters_total", agency=AGENCY, reason="content_rejected"
    )
    assert rejected == len(refused)


# -- bad credentials: parked, and the key stays secret ---------------------------------------


@dataclasses.dataclass
class WrongKeyRun:
    world: RelayWorld
    relay: Relay
    parked: Json  # agence-a's document, refused with 401
    published: Json  # agence-b's document, delivered
    refused: Json  # agence-b's document with a wrong checksum, dead-lettered
    secrets: tuple[str, ...]


async def run_with_a_wrong_key(relay_world: WorldFactory) -> WrongKeyRun:
    """agence-a's key file holds a key the partner does not know; agence-b's is right."""
    agencies = {
        AGENCY: AgencySpec(buildings={"bat-1": "c-1"}),
        "agence-b": AgencySpec(buildings={"bat-9": "c-9"}),
    }
    world = await relay_world(agencies=agencies)
    wrong_key = "wrong-key-7f3a9c1e5b"
    (world.keys_dir / AGENCY).write_text(wrong_key + "\n", encoding="utf-8")
    relay = await world.start_relay()
    parked = world.document(title="PV AG 2025")
    published = world.document(title="Contrat chauffage")
    refused = with_content(world.document(), sha256=hashlib.sha256(b"other").hexdigest())

    await world.publish(
        world.document_created(AGENCY, "bat-1", parked),
        world.document_created("agence-b", "bat-9", published),
        world.document_created("agence-b", "bat-9", refused),
    )

    await world.wait_until(lambda: statuses(relay).get("parked") == 1, what="the parked document")
    await world.wait_until(
        lambda: published["id"] in world.partner_references("c-9"), what="agence-b's upload"
    )
    await wait_for_dead_letters(world, 1)
    await wait_until_committed(world)
    keys = (wrong_key, agencies["agence-b"].api_key)
    basic = tuple(base64.b64encode(f"{key}:".encode()).decode() for key in keys)
    return WrongKeyRun(world, relay, parked, published, refused, secrets=keys + basic)


async def test_a_wrong_api_key_parks_the_document_and_does_not_dead_letter_it(
    relay_world: WorldFactory,
) -> None:
    run = await run_with_a_wrong_key(relay_world)
    world = run.world

    assert world.sandbox.request_count(status=401) >= 1
    assert world.partner_references("c-1") == {}
    assert statuses(run.relay) == {"parked": 1, "published": 1}
    letters = await world.dead_letters()
    dead_lettered = [
        orjson.loads(base64.b64decode(letter["record"]["value_base64"]))["document"]["id"]
        for letter in letters
    ]
    assert dead_lettered == [run.refused["id"]]
    parked = [
        record
        for record in await changelog(world)
        if isinstance(record, DocumentRecord) and record.status is DocStatus.PARKED
    ]
    assert [record.key.document_id for record in parked] == [run.parked["id"]]
    assert parked[0].parked_reason is not None
    assert "401" in parked[0].parked_reason

    async def counted_as_parked() -> bool:
        body = await ops_get(run.relay, "/metrics")
        parked = [
            sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
            if sample.name == "chouette_relay_parked_documents"
        ]
        return sum(parked) == 1

    await world.wait_until(counted_as_parked, timeout=10, what="the parked documents gauge")


async def test_api_keys_appear_in_no_log_metric_status_or_topic(
    relay_world: WorldFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    run = await run_with_a_wrong_key(relay_world)
    world = run.world
    metrics_body = await ops_get(run.relay, "/metrics")
    status_body = await ops_get(run.relay, "/status")
    await world.stop_relay(run.relay)  # the shutdown path logs too

    formatter = JsonFormatter()
    logs = [formatter.format(record) for record in caplog.records]
    assert any(run.parked["id"] in line and "401" in line for line in logs), "the 401 is logged"
    assert_absent(run.secrets, logs, where="logs")
    assert_absent(run.secrets, [metrics_body], where="/metrics")
    assert_absent(run.secrets, [status_body], where="/status")
    letters = await world.read_topic(world.dead_letter_topic)
    assert letters, "the dead-letter topic has a record to check"
    assert_absent(run.secrets, raw_text(letters), where="the dead-letter topic")
    assert_absent(
        run.secrets,
        (text for letter in letters for text in dead_lettered_record(letter.value)),
        where="the records inside dead letters",
    )
    assert_absent(run.secrets, raw_text(await world.read_topic(world.state_topic)), where="state")


def assert_absent(secrets: Iterable[str], texts: Iterable[str], *, where: str) -> None:
    texts = list(texts)
    assert texts, f"{where}: nothing to check"
    for secret in secrets:
        leaks = [text for text in texts if secret in text]
        assert not leaks, f"an API key (or its Basic auth form) appears in {where}: {leaks[:1]}"


def raw_text(records: Iterable[Any]) -> Iterator[str]:
    """Key, value and header values of Kafka records, as text."""
    for record in records:
        parts = [record.key, record.value, *(value for _, value in record.headers or ())]
        yield from (bytes(part).decode("utf-8", errors="replace") for part in parts if part)


def dead_lettered_record(value: bytes) -> Iterator[str]:
    """The original key, value and headers a dead letter carries in base64, as text."""
    record = orjson.loads(value)["record"]
    encoded = [record["key_base64"], record["value_base64"]]
    encoded += [header["value_base64"] for header in record["headers"]]
    for part in encoded:
        if part is not None:
            yield base64.b64decode(part).decode("utf-8", errors="replace")


async def changelog(world: RelayWorld) -> list[object]:
    records = await world.read_topic(world.state_topic)
    return [decode_state(record.key, record.value) for record in records]
