"""A document whose content cannot be had is the document's problem, not its agency's.

When the document store cannot serve one document, that document retries on its own (bounded,
jittered, counted) and is parked as ``content_unavailable`` after the bound; it never counts for
the agency's circuit breaker, so the agency's other documents flow meanwhile. A document URL the
HTTP stack cannot parse is dead-lettered as ``bad_url`` and the relay carries on.
"""

from __future__ import annotations

import base64

import orjson
import pytest

from consumer.app.relay import Relay
from consumer.settings import ContentSettings, PartnerSettings
from tests.fixtures.relay import (
    AgencySpec,
    Json,
    RelayWorld,
    WorldFactory,
    metric,
    uncommitted_records,
)

pytestmark = pytest.mark.integration

AGENCY = "agence-a"


def store_name(document: Json) -> str:
    url: str = document["content"]["url"]
    return url.rsplit("/", 1)[1].removesuffix(".pdf")


def statuses(relay: Relay) -> dict[str, int]:
    """Documents in the relay's view by status, over every partition (zeros left out)."""
    total: dict[str, int] = {}
    for partition in relay.status()["partitions"].values():
        for status, count in partition["by_status"].items():
            total[status] = total.get(status, 0) + count
    return {status: n for status, n in total.items() if n}


async def wait_until_committed(world: RelayWorld) -> None:
    async def committed() -> bool:
        return await uncommitted_records(world) == 0

    await world.wait_until(committed, timeout=20, what="every input offset committed", interval=0.3)


async def test_content_the_store_cannot_serve_parks_its_document_and_never_blocks_the_agency(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    store = world.store
    partner = world.settings().partner
    relay = await world.start_relay(
        # A breaker that opens after one failure and stays open long: were the document's
        # failures counted, its agency would stop for the rest of the test.
        partner=PartnerSettings(
            **{**partner.model_dump(), "breaker_failures": 1, "breaker_cooldown_s": 600}
        ),
        content=ContentSettings(
            allowed_hosts=(f"{store.host}:{store.port}",),
            unavailable_attempts=3,
            unavailable_backoff_s=2.0,
        ),
    )
    stuck = world.document(title="Carnet d'entretien")
    store.set_status(store_name(stuck), 503)
    others = [world.document(title=f"Document {n}") for n in range(5)]

    await world.publish(world.document_created(AGENCY, "bat-1", stuck))
    await world.wait_until(lambda: store.request_count(store_name(stuck)) >= 1, what="a fetch")
    await world.publish(*(world.document_created(AGENCY, "bat-1", d) for d in others))

    # They go while the stuck document still waits on its own.
    await world.wait_until(
        lambda: statuses(relay) == {"published": len(others), "uploading": 1},
        what="the other documents published, the stuck one waiting",
    )
    await world.wait_until(
        lambda: statuses(relay) == {"published": len(others), "parked": 1},
        what="the stuck document parked",
    )
    await wait_until_committed(world)

    [entry] = relay.parked()
    assert entry["document"] == stuck["id"]
    assert entry["reason"].startswith("content_unavailable: ")
    assert store.request_count(store_name(stuck)) == 3  # bounded
    retried = await metric(
        relay, "chouette_relay_document_retries_total", reason="content_unavailable"
    )
    assert retried == 2.0
    assert await metric(relay, "chouette_relay_circuit_open", agency=AGENCY) == 0.0
    assert world.partner_references("c-1") == {d["id"]: d["content"]["sha256"] for d in others}
    assert await world.dead_letters() == []
    assert relay.failure is None


async def test_a_url_the_http_stack_cannot_parse_is_dead_lettered_and_the_relay_goes_on(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    relay = await world.start_relay()
    bad = world.document(title="Port hors limites")
    bad["content"]["url"] = f"http://{world.store.host}:70000/documents/{store_name(bad)}.pdf"
    good = world.document(title="Contrat ascenseur")
    events = [world.document_created(AGENCY, "bat-1", d) for d in (bad, good)]

    await world.publish(*events)

    await world.wait_until(
        lambda: good["id"] in world.partner_references("c-1"), what="the good document"
    )
    await wait_until_committed(world)
    [letter] = await world.dead_letters()
    assert letter["reason"] == "bad_url"
    assert orjson.loads(base64.b64decode(letter["record"]["value_base64"])) == events[0]
    assert (
        await metric(relay, "chouette_relay_dead_letters_total", agency=AGENCY, reason="bad_url")
        == 1.0
    )
    assert relay.failure is None
    assert relay.parked() == []
