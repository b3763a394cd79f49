"""What the partner says about one document never stops the relay or holds another one back.

A withdrawal the partner refuses (a revoked key, missing rights, 422) is parked with the refusal
while the building's other work goes on, and is carried out when parked work is retried after the
operator's fix. Answers that are malformed after the partner acted (bad JSON, a proxy's HTML 502,
a 200 with an error body, a connection that hangs) neither lose a document nor upload it twice:
the lookup by reference decides. A partner error that echoes the credentials, in whatever
encoding, reaches no log line, status page, state record or dead letter.
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.parse
from collections.abc import Iterable

import pytest

from consumer.app.relay import Relay
from consumer.local.sandbox import Answer, Scripted
from consumer.ops.logs import JsonFormatter
from consumer.settings import PartnerSettings
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


async def wait_until_committed(world: RelayWorld) -> None:
    async def committed() -> bool:
        return await uncommitted_records(world) == 0

    await world.wait_until(committed, timeout=20, what="every input offset committed", interval=0.3)


def parked(relay: Relay) -> dict[str, Json]:
    return {entry["document"]: entry for entry in relay.parked()}


async def published(world: RelayWorld, relay: Relay, *documents: Json) -> None:
    def there() -> bool:
        held = world.partner_references("c-1")
        return all(held.get(d["id"]) == d["content"]["sha256"] for d in documents)

    await world.wait_until(there, what="the documents on the partner")


# -- a refused withdrawal --------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403, 422])
async def test_a_refused_withdrawal_is_parked_and_the_relay_goes_on(
    relay_world: WorldFactory, status: int
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    relay = await world.start_relay()
    kept, withdrawn = world.document(title="Règlement"), world.document(title="PV AG 2023")
    await world.publish(*world.manifest_parts(AGENCY, "bat-1", [kept, withdrawn]))
    await published(world, relay, kept, withdrawn)

    world.sandbox.script("DELETE", Scripted(Answer.REFUSE, status))
    added = world.document(title="Contrat ascenseur")
    await world.publish(*world.manifest_parts(AGENCY, "bat-1", [kept, added]))

    await world.wait_until(lambda: withdrawn["id"] in parked(relay), what="the withdrawal parked")
    entry = parked(relay)[withdrawn["id"]]
    assert entry["operation"] == "withdraw"
    assert entry["reason"].startswith("partner_")
    assert str(status) in entry["reason"]
    await published(world, relay, added)  # the rest of the manifest was carried out
    later = world.document(title="Budget 2026")
    await world.publish(world.document_created(AGENCY, "bat-1", later))
    await published(world, relay, later)  # and the relay goes on with the next events
    await wait_until_committed(world)
    assert relay.failure is None
    assert world.sandbox.request_count("DELETE", status) == 1
    assert withdrawn["id"] in world.partner_references("c-1")  # refused: still there
    status_page = json.loads(await ops_get(relay, "/status"))
    assert [p["document"] for p in status_page["parked"]] == [withdrawn["id"]]
    done = await metric(
        relay,
        "chouette_relay_operations_total",
        lane="live",
        operation="delete",
        outcome="parked",
    )
    assert done == 1.0

    # The operator fixes the key or its rights and restarts: parked work is retried.
    await world.stop_relay(relay)
    relay = await world.start_relay()

    await world.wait_until(
        lambda: withdrawn["id"] not in world.partner_references("c-1"),
        what="the parked withdrawal carried out",
    )
    await world.wait_until(lambda: parked(relay) == {}, what="nothing parked any more")
    assert world.partner_references("c-1") == {
        d["id"]: d["content"]["sha256"] for d in (kept, added, later)
    }
    assert await world.dead_letters() == []


# -- malformed answers -----------------------------------------------------------------------


async def test_malformed_answers_neither_lose_a_document_nor_upload_it_twice(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    partner = world.settings().partner
    # One request at a time, so that each scripted answer meets an upload, in order.
    relay = await world.start_relay(
        partner=PartnerSettings(**{**partner.model_dump(), "concurrency": 1, "timeout_s": 1.0})
    )
    world.sandbox.script(
        "POST",
        Scripted(Answer.BAD_JSON),  # created; the answer cannot be read
        Scripted(Answer.HTML_502),  # created behind a proxy that answered 502
        Scripted(Answer.ERROR_200),  # not created; 200 with an error body
        Scripted(Answer.HANG),  # created; the answer never comes
    )
    documents = [world.document(title=f"Document {n}") for n in range(6)]

    await world.publish(*(world.document_created(AGENCY, "bat-1", d) for d in documents))

    await published(world, relay, *documents)
    await wait_until_committed(world)
    assert world.sandbox.scripted_left() == 0
    assert world.partner_references("c-1") == {d["id"]: d["content"]["sha256"] for d in documents}
    assert len(world.sandbox.documents("c-1")) == len(documents)
    assert world.sandbox.duplicated_references() == {}
    assert parked(relay) == {}
    assert await world.dead_letters() == []


async def test_a_document_deleted_by_hand_and_sent_again_behind_a_spoilt_answer_is_created_once(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    partner = world.settings().partner
    relay = await world.start_relay(
        partner=PartnerSettings(**{**partner.model_dump(), "concurrency": 1, "timeout_s": 1.0})
    )
    first = world.document(doc_id="doc-1", title="Budget 2025")
    await world.publish(world.document_created(AGENCY, "bat-1", first))
    await published(world, relay, first)
    (on_partner,) = world.sandbox.documents("c-1")
    world.sandbox.delete_by_hand(on_partner.id)
    # The change is an update of a document that is gone (404), so it is created again; that
    # create is carried out but its answer cannot be read, and the retry must not create twice.
    world.sandbox.script("POST", Scripted(Answer.HTML_502))
    changed = world.document(doc_id="doc-1", title="Budget 2025, amended")

    await world.publish(world.document_created(AGENCY, "bat-1", changed))

    await published(world, relay, changed)
    await wait_until_committed(world)
    assert world.sandbox.scripted_left() == 0
    assert world.sandbox.create_count("doc-1") == 2  # the first publication, then once again
    assert [d.reference for d in world.sandbox.documents("c-1")] == ["doc-1"]


# -- credentials echoed by the partner -------------------------------------------------------

SECRET_KEY = "K3y/é+Ab=Zq9"


def every_form(key: str) -> list[str]:
    """The key as a careless partner might echo it."""
    basic = base64.b64encode(f"{key}:".encode()).decode()
    as_json = json.dumps(key, ensure_ascii=True)[1:-1]
    return [
        key,
        basic,
        basic.replace("/", "\\/"),
        as_json,
        as_json.replace("/", "\\/"),
        as_json.replace("\\u00e9", "\\u00E9"),
        urllib.parse.quote(key, safe=""),
        urllib.parse.quote_plus(key),
        urllib.parse.quote(key, safe="").lower(),
    ]


def assert_absent(secrets: Iterable[str], texts: Iterable[str], *, where: str) -> None:
    texts = list(texts)
    assert texts, f"{where}: nothing to check"
    for secret in secrets:
        leaks = [text for text in texts if secret in text]
        assert not leaks, f"a form of the API key ({secret!r}) appears in {where}: {leaks[:1]}"


async def test_credentials_echoed_by_the_partner_reach_no_log_status_state_or_dead_letter(
    relay_world: WorldFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    spec = AgencySpec(buildings={"bat-1": "c-1"}, key=SECRET_KEY)
    world = await relay_world(agencies={AGENCY: spec})
    partner = world.settings().partner
    relay = await world.start_relay(
        partner=PartnerSettings(**{**partner.model_dump(), "concurrency": 1})
    )
    kept, withdrawn = world.document(title="Règlement"), world.document(title="PV AG 2023")
    await world.publish(*world.manifest_parts(AGENCY, "bat-1", [kept, withdrawn]))
    await published(world, relay, kept, withdrawn)
    refused, rejected = world.document(title="Contrat"), world.document(title="Devis")
    world.sandbox.script(
        "POST",
        Scripted(Answer.ECHO_CREDENTIALS, 401),  # parked
        Scripted(Answer.ECHO_CREDENTIALS, 422),  # dead-lettered
    )
    world.sandbox.script("DELETE", Scripted(Answer.ECHO_CREDENTIALS, 403))  # withdrawal parked

    await world.publish(
        world.document_created(AGENCY, "bat-1", refused),
        world.document_created(AGENCY, "bat-1", rejected),
    )
    await world.wait_until(lambda: len(parked(relay)) == 1, what="the 401 parked")
    # The manifest withdraws one document (refused, echoing) and lists the parked one, which
    # is sent again (and accepted now): the state topic saw both refusals.
    await world.publish(*world.manifest_parts(AGENCY, "bat-1", [kept, refused]))
    await world.wait_until(
        lambda: list(parked(relay)) == [withdrawn["id"]], what="only the withdrawal parked"
    )
    await wait_until_committed(world)
    assert world.sandbox.scripted_left() == 0
    status_body = await ops_get(relay, "/status")
    metrics_body = await ops_get(relay, "/metrics")
    await world.stop_relay(relay)

    reasons = [entry["reason"] for entry in json.loads(status_body)["parked"]]
    assert all("***" in reason for reason in reasons), reasons  # the echo arrived, redacted
    letters = await world.read_topic(world.dead_letter_topic)
    assert len(letters) == 1
    assert "***" in json.loads(letters[0].value)["detail"]
    secrets = every_form(SECRET_KEY)
    formatter = JsonFormatter()
    logs = [formatter.format(record) for record in caplog.records]
    assert any("***" in line for line in logs), "the refusals are logged"
    assert_absent(secrets, logs, where="logs")
    assert_absent(secrets, [status_body], where="/status")
    assert_absent(secrets, [metrics_body], where="/metrics")
    assert_absent(secrets, [letter.value.decode() for letter in letters], where="dead letters")
    state = await world.read_topic(world.state_topic)
    assert any(r.value and b"***" in r.value for r in state)  # refusals recorded, redacted
    # Compact document records are binary: their ASCII bytes (any form of a key) stay as they are.
    state_values = [r.value.decode("utf-8", "backslashreplace") for r in state if r.value]
    assert_absent(secrets, state_values, where="the state topic")
