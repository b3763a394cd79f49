"""What Prometheus scrapes from a running relay: well-formed, and enough for every alert.

A relay runs against the broker, the sandbox and the document store, forwards a document, parks
one, dead-letters a poison record and audits the agency, then ``/metrics`` is scraped as
Prometheus would: the text must pass ``promtool check metrics``, and every metric an alert rule
names must be in it (an alert on a name the relay does not export never fires). The relay only
counts an offset commit as progress when an offset moves, which is what the stalled-consumer
alert relies on.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from consumer.app.relay import Relay
from consumer.ops.admin import Operator
from consumer.ops.overview import gather
from tests.fixtures.relay import (
    AgencySpec,
    RelayWorld,
    WorldFactory,
    metric,
    ops_get,
    uncommitted_records,
)
from tests.integration.operator_helpers import call, cli, many_documents, token_http

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
AGENCY = "agence-a"
RELAY_METRIC = re.compile(r"\bchouette_relay_[a-z0-9_]+")


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool is not installed: install the Debian package 'prometheus'"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def alert_metric_names() -> set[str]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    return {name for rule in rules for name in RELAY_METRIC.findall(rule["expr"])}


def sample_names(exposition: str) -> set[str]:
    return {
        sample.name
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


async def busy_relay(world: RelayWorld) -> Relay:
    """A relay that has uploaded a document, parked one, dead-lettered a poison record and
    audited the agency (a labelled gauge has no sample until it is set)."""
    relay = await world.start_relay(http=token_http(world.tmp))
    sent, parked = world.document(title="Procès-verbal d'AG"), world.document(title="Contrat")
    await world.publish(
        world.document_created(AGENCY, "bat-1", sent),
        world.document_created(AGENCY, "bat-unmapped", parked),
    )
    await world.publish_raw(world.documents_topic, key=b"agence-a:bat-1", value=b"{not json")
    await world.wait_until(
        lambda: sent["id"] in world.partner_references("c-1"), what="the document uploaded"
    )

    async def counted() -> bool:
        dead = await metric(
            relay, "chouette_relay_dead_letters_total", agency=AGENCY, reason="not_json"
        )
        held = await metric(
            relay, "chouette_relay_parked_documents", agency=AGENCY, reason="unmapped_building"
        )
        return dead == held == 1

    await world.wait_until(counted, what="the dead letter and the parked document counted")
    status, _ = await call(relay, "GET", f"/admin/audit?agency={AGENCY}", token=True)
    assert status == 200
    return relay


async def test_a_real_scrape_passes_promtool_and_feeds_every_alert(
    relay_world: WorldFactory, promtool: str
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    relay = await busy_relay(world)
    exposition = await ops_get(relay, "/metrics")

    lint = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    report, _ = await asyncio.wait_for(lint.communicate(exposition.encode()), timeout=60)
    assert lint.returncode == 0, f"promtool check metrics:\n{report.decode()}"
    assert report == b"", report.decode()
    missing = alert_metric_names() - sample_names(exposition)
    assert not missing, f"alerts name metrics the relay does not export: {sorted(missing)}"


async def test_only_a_commit_that_moves_an_offset_counts_as_progress(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(
        agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})}, partitions=1
    )
    relay = await world.start_relay()
    name = "chouette_relay_last_offset_commit_timestamp_seconds"
    started = await metric(relay, name)
    assert started is not None

    await world.publish(world.document_created(AGENCY, "bat-1", world.document()))

    async def all_committed() -> bool:
        return await uncommitted_records(world) == 0

    await world.wait_until(all_committed, what="the document's offset committed")
    progressed = await metric(relay, name)
    assert progressed is not None
    assert progressed > started
    commits = await metric(relay, "chouette_relay_offset_commits_total")
    assert commits is not None

    async def committed_again() -> bool:
        value = await metric(relay, "chouette_relay_offset_commits_total")
        return value is not None and value >= commits + 3

    # Nothing new to read: the relay commits the same offsets again, which is not progress.
    await world.wait_until(committed_again, what="three more commits")
    assert await metric(relay, name) == progressed


async def lag_partitions(relay: Relay, topic: str) -> set[str]:
    """Partitions of ``topic`` for which ``relay`` reports a consumer lag."""
    exposition = await ops_get(relay, "/metrics")
    return {
        sample.labels["partition"]
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == "chouette_relay_consumer_lag_records" and sample.labels["topic"] == topic
    }


async def test_a_replica_stops_reporting_the_lag_of_partitions_it_gave_up(
    relay_world: WorldFactory,
) -> None:
    partitions = 4
    world = await relay_world(
        agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})}, partitions=partitions
    )
    first = await world.start_relay()
    topic = world.documents_topic
    # A partition has a lag once the relay has read from it: one (poison) record in each.
    producer = await world.producer()
    for partition in range(partitions):
        await producer.send_and_wait(topic, value=b"{not json", key=b"x:y", partition=partition)

    async def reports_all() -> bool:
        return await lag_partitions(first, topic) == {str(p) for p in range(partitions)}

    await world.wait_until(reports_all, what="the lag of all three partitions")

    second = await world.start_relay()

    def owned(relay: Relay) -> set[str]:
        return set(relay.status()["partitions"])

    await world.wait_until(
        lambda: (
            first.is_ready()
            and second.is_ready()
            and bool(owned(first))
            and bool(owned(second))
            and owned(first).isdisjoint(owned(second))
        ),
        # Two relays on one event loop: on a loaded machine the group may rejoin more than once.
        timeout=120,
        what="the partitions shared between the two replicas",
    )

    async def only_its_own() -> bool:
        return await lag_partitions(first, topic) == owned(first)

    # A frozen lag of a partition now read by the other replica would be summed twice.
    await world.wait_until(only_its_own, what="the first replica to report only its partitions")


async def test_a_held_event_loop_shows_on_metrics_as_a_late_tick(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    relay = await world.start_relay()
    count = "chouette_relay_event_loop_tick_lag_seconds_count"

    async def ticked() -> bool:
        return bool(await metric(relay, count))

    await world.wait_until(ticked, what="the first tick of the event loop's watcher")

    async def over_a_second() -> float:
        ticks = await metric(relay, count)
        on_time = await metric(relay, "chouette_relay_event_loop_tick_lag_seconds_bucket", le="1.0")
        assert ticks is not None
        assert on_time is not None
        return ticks - on_time

    before = await over_a_second()
    # The relay shares this test's event loop: a synchronous step holds it as a slow record would.
    time.sleep(2.5)  # noqa: ASYNC251 - holding the loop is the behaviour under test (a tick is
    # due every half second: whenever the last one fired, the next comes at least 2 s late)

    async def counted() -> bool:
        return await over_a_second() >= before + 1

    await world.wait_until(counted, what="a tick counted more than a second late")


async def test_the_progress_gauges_carry_what_status_shows_during_a_first_publication(
    relay_world: WorldFactory,
) -> None:
    """Done of planned comes from gauges, not from counters over a range: a dashboard shows the
    progress ``status`` shows, whenever the first publication began. A pause mid-way holds it
    still so that both can be read."""
    documents = 120
    world = await relay_world(
        agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"}, rate_per_second=10, burst=1)}
    )
    relay = await world.start_relay()
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    listed = many_documents(world, documents)
    await world.publish(*world.manifest_parts(AGENCY, "bat-1", listed, taken_at=taken_at))
    await world.wait_until(
        lambda: len(world.partner_references("c-1")) >= 5, what="the first publication under way"
    )
    await cli(world, "pause", AGENCY)
    await world.wait_until(lambda: relay.status()["paused"] == [AGENCY], what="the pause")

    async with Operator(world.settings()) as operator:

        async def gauges_show_status() -> bool:
            [entry] = (await gather(operator, agency=AGENCY)).values()
            done = await metric(
                relay, "chouette_relay_first_publication_done_documents", agency=AGENCY
            )
            planned = await metric(
                relay, "chouette_relay_first_publication_planned_documents", agency=AGENCY
            )
            shown = (entry.published, entry.published + entry.remaining)
            return shown == (done, planned) and 0 < entry.published < documents == planned

        await world.wait_until(gauges_show_status, what="the gauges showing status's progress")


async def test_a_dead_letter_of_an_agency_the_routing_does_not_name_counts_as_unknown(
    relay_world: WorldFactory,
) -> None:
    """The agency label keeps to the routing's agencies: a key naming any other cannot add one."""
    world = await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})
    relay = await world.start_relay()
    await world.publish_raw(world.documents_topic, key=b"agence-z:bat-1", value=b"{not json")

    async def counted() -> bool:
        name = "chouette_relay_dead_letters_total"
        return await metric(relay, name, agency="unknown", reason="not_json") == 1

    await world.wait_until(counted, what="the dead letter counted under unknown")
    assert "agence-z" not in await ops_get(relay, "/metrics")
