"""The audit asks ChouetteCopro at no more than its share of the agency's rate.

The sandbox enforces a rate per API key, as ChouetteCopro does, and answers 429 beyond it: an
audit that listed a large agency as fast as it could, or that sent its list requests beside the
agency's uploads instead of within the agency's rate, would be seen there. Only a replica's audit
shares the agency's limiter and sets the findings metric; the CLI can ask a replica to run it.
"""

from __future__ import annotations

import datetime as dt

import orjson
import pytest

from consumer.app.relay import Relay
from consumer.local.sandbox import Answer, Scripted
from consumer.local.sandbox import RateLimit as SandboxRate
from consumer.settings import AuditSettings
from tests.fixtures.relay import AgencySpec, RelayWorld, WorldFactory, metric
from tests.integration.operator_helpers import call, cli, cli_output, token_http

pytestmark = pytest.mark.integration

AGENCY = "agence-a"
HAND_MADE = 1500  # fifteen pages of a hundred


def _seed_hand_made(world: RelayWorld, condominium: str) -> None:
    for number in range(HAND_MADE):
        world.sandbox.seed_manual_document(condominium, f"Affiche {number}")


def _replica(relay: Relay) -> str:
    return f"http://127.0.0.1:{relay.ops_port}"


async def test_an_audit_from_the_cli_lists_a_large_agency_at_its_share_of_the_rate(
    relay_world: WorldFactory,
) -> None:
    # The agency may send 20 requests a second; the audit a quarter of that. ChouetteCopro
    # allows exactly that quarter (with a little room for network jitter) and no more.
    world = await relay_world(
        agencies={
            AGENCY: AgencySpec(
                buildings={"bat-1": "c-1"},
                rate_per_second=20.0,
                burst=20,
                sandbox_rate=SandboxRate(rate_per_s=5.0, burst=3),
            )
        },
        audit=AuditSettings(rate_share=0.25),
    )
    _seed_hand_made(world, "c-1")

    out, err = await cli_output(world, "audit", "--agency", AGENCY)

    assert world.sandbox.request_count("GET", 429) == 0
    assert world.sandbox.request_count("GET", 200) == HAND_MADE // 100
    assert "--replica" in err  # why no metric was set, and how to have one
    report = orjson.loads(out)
    assert report["condominia"][0]["hand_made"] == HAND_MADE
    assert report["requests"] == {
        "sent": HAND_MADE // 100,
        "per_second_at_most": 5.0,
        "share_of_agency_rate": 0.25,
        "agency_limiter": False,
    }


async def test_a_replica_audit_during_a_first_publication_stays_within_the_agency_rate(
    relay_world: WorldFactory,
) -> None:
    # ChouetteCopro allows the agency's rate; the relay uploads a backfill at that rate while
    # an audit of another building of the agency lists fifteen pages. Sent beside the uploads,
    # the list requests would exceed the rate and be refused with 429.
    world = await relay_world(
        agencies={
            AGENCY: AgencySpec(
                buildings={"bat-1": "c-1", "bat-2": "c-2"},
                rate_per_second=10.0,
                burst=2,
                sandbox_rate=SandboxRate(rate_per_s=10.0, burst=4),
            )
        },
        audit=AuditSettings(rate_share=0.5),
    )
    _seed_hand_made(world, "c-2")
    relay = await world.start_relay(http=token_http(world.tmp))
    backfill = [world.document(index=i) for i in range(120)]
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    await world.publish(*world.manifest_parts(AGENCY, "bat-1", backfill, taken_at=taken_at))
    await world.wait_until(
        lambda: len(world.partner_references("c-1")) >= 10, what="the backfill under way"
    )

    status, report = await call(
        relay, "GET", f"/admin/audit?agency={AGENCY}&building=bat-2", token=True
    )

    assert status == 200, report
    assert len(world.partner_references("c-1")) < len(backfill)  # the audit ran beside it
    assert report["condominia"][0]["hand_made"] == HAND_MADE
    assert report["requests"]["sent"] == HAND_MADE // 100
    assert report["requests"]["agency_limiter"] is True
    await world.wait_until(
        lambda: len(world.partner_references("c-1")) == len(backfill),
        timeout=120,
        what="the backfill finished",
    )
    assert world.sandbox.request_count(status=429) == 0


async def test_the_cli_asks_a_replica_to_audit_and_the_findings_metric_is_set(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    relay = await world.start_relay(http=token_http(world.tmp))
    documents = [world.document() for _ in range(3)]
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    await world.publish(*world.manifest_parts(AGENCY, "bat-1", documents, taken_at=taken_at))
    await world.wait_until(lambda: len(world.partner_references()) == 3, what="3 published")
    [gone] = [d.id for d in world.sandbox.documents() if d.reference == documents[0]["id"]]
    world.sandbox.delete_by_hand(gone)

    alone = await cli(world, "audit", "--agency", AGENCY)
    assert alone["findings"]["missing"] == 1
    assert (
        await metric(relay, "chouette_relay_audit_findings", agency=AGENCY, kind="missing") is None
    )

    asked = await cli(
        world, "audit", "--agency", AGENCY, "--replica", _replica(relay), http=token_http(world.tmp)
    )

    assert asked["findings"] == {"missing": 1, "unexpected": 0, "changed": 0}
    assert asked["requests"]["agency_limiter"] is True
    assert await metric(relay, "chouette_relay_audit_findings", agency=AGENCY, kind="missing") == 1


async def test_an_audit_goes_on_after_a_short_refusal_of_the_partner(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    for number in range(250):  # three pages
        world.sandbox.seed_manual_document("c-1", f"Affiche {number}")
    # The first page is refused twice: too many requests, then unavailable.
    world.sandbox.script("GET", Scripted(Answer.REFUSE, 429), Scripted(Answer.REFUSE, 503))

    out, _ = await cli_output(world, "audit", "--agency", AGENCY)

    assert world.sandbox.scripted_left() == 0
    assert world.sandbox.request_count("GET", 429) == 1
    assert world.sandbox.request_count("GET", 503) == 1
    assert world.sandbox.request_count("GET", 200) == 3
    assert orjson.loads(out)["condominia"][0]["hand_made"] == 250


async def test_an_audit_the_partner_does_not_answer_stops_with_why_and_repairs_nothing(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    relay = await world.start_relay(http=token_http(world.tmp))
    world.sandbox.set_faults(outage_seconds=600)

    _, err = await cli_output(world, "audit", "--agency", AGENCY, "--repair", expect=2)
    status, answer = await call(relay, "POST", f"/admin/audit/repair?agency={AGENCY}", token=True)

    assert "the audit stopped, nothing was repaired" in err
    assert "Traceback" not in err
    assert status == 502
    assert "list" in answer["error"]
