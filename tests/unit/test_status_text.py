"""What ``status`` and ``plan`` print: why an agency waits, how fast it goes, sizes, order."""

from __future__ import annotations

from dataclasses import replace

from consumer.core.events import Module
from consumer.core.planning.first_publication import DryRun, DryRunLine
from consumer.core.routing import RoutingTable
from consumer.ops.dryrun import render as render_plan
from consumer.ops.overview import AgencyOverview, render

SENDING = AgencyOverview(
    "agence-a",
    published=1000,
    published_bytes=800 * 1024,
    remaining=3000,
    remaining_bytes=2400 * 1024,
    rate_per_second=100.0,
)


def _pace_line(entry: AgencyOverview, previous: AgencyOverview | None = None) -> str:
    earlier = None if previous is None else {previous.agency: previous}
    text = render({entry.agency: entry}, earlier, 10.0)
    return text.splitlines()[2].strip()


def test_a_finished_publication_says_done() -> None:
    done = replace(SENDING, remaining=0, remaining_bytes=0)
    assert _pace_line(done) == "done"


def test_a_paused_agency_says_it_is_paused_not_a_time_left() -> None:
    paused = replace(SENDING, paused=True)
    assert _pace_line(paused) == "paused: nothing is sent until chouette-relay resume agence-a"


def test_a_backfill_only_pause_says_the_first_publication_waits() -> None:
    paused = replace(SENDING, backfill_paused=True)
    assert _pace_line(paused) == (
        "paused: its first publication waits until chouette-relay resume agence-a"
    )
    header = render({paused.agency: paused}, None, None).splitlines()[0]
    assert header == "agence-a  (PAUSED, backfill only: live documents are sent)"


def test_an_unapproved_first_publication_says_it_waits_for_approval() -> None:
    waiting = replace(SENDING, published=0, published_bytes=0, unapproved=True)
    assert _pace_line(waiting) == "waits for approval (chouette-relay plan --agency agence-a)"


def test_the_time_left_is_given_at_the_measured_rate_beside_the_agency_rate() -> None:
    before = replace(SENDING, published=800, remaining=3200)
    line = _pace_line(SENDING, before)  # 200 more in 10 s: 20 a second
    assert line == (
        "rate 20.0/s, 2m30s left at that rate; 0m30s left at the agency's 100 requests/s"
    )


def test_sizes_are_shown_in_a_readable_unit() -> None:
    text = render({"agence-a": SENDING})
    assert "1000 of 4000 documents, 800.0 KiB of 3.1 MiB" in text


def test_many_buildings_awaiting_approval_fit_on_one_line() -> None:
    entry = replace(SENDING, awaiting_approval=[f"bat-{n:02d}" for n in range(1, 21)])
    [line] = [ln for ln in render({"agence-a": entry}).splitlines() if "awaiting" in ln]
    assert line.endswith("bat-01, bat-02, bat-03, bat-04, bat-05 and 15 more buildings")


def test_the_plan_lists_buildings_in_order_whatever_partition_they_came_from() -> None:
    lines = tuple(
        DryRunLine("agence-a", building, module, uploads=1)
        for building in ("bat-12", "bat-02", "bat-07")
        for module in (Module.CONTRATS, Module.AG)
    )
    text = render_plan(DryRun(lines), RoutingTable(agencies={}), 5.0, {})
    shown = [line.split()[1:3] for line in text.splitlines()[1:7]]
    assert shown == [
        [building, module]
        for building in ("bat-02", "bat-07", "bat-12")
        for module in ("ag", "contrats")
    ]
