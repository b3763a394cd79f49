"""The whole cluster per agency, for ``chouette-relay status``: progress, backlog, what waits.

Everything comes from Kafka, so any pod (or a laptop with access) sees the same: the views of
every partition of the state topic (published documents and bytes, held withdrawals, parked
documents and why, pauses), the dry run of what manifests would still send (so progress is what
is on the partner out of what will be once the first publication is over), the input records the
consumer group has not committed yet (the live backlog), and the dead-letter topic. A replica
adds what only it knows (breakers, first publications awaiting approval).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.core.events import Module
from consumer.core.routing import RoutingTable
from consumer.core.state import ON_PARTNER, DocStatus
from consumer.core.view import PublishedView
from consumer.kafka.reading import records_until
from consumer.kafka.startup import start_client
from consumer.ops.admin import Operator
from consumer.ops.dryrun import plan_with_fingerprints
from consumer.ops.replay import read_dead_letters


@dataclass
class AgencyOverview:
    """One agency across the cluster."""

    agency: str
    paused: bool = False
    backfill_paused: bool = False  # only the first publication waits; live documents go on
    published: int = 0
    published_bytes: int = 0
    remaining: int = 0  # uploads being sent, and those the newest manifests would still send
    remaining_bytes: int = 0
    baseline: int = 0
    live_backlog: int = 0  # document-created records not committed yet
    manifest_backlog: int = 0  # manifest records not committed yet
    held: int = 0
    parked: int = 0
    parked_reasons: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    rate_per_second: float = 0.0
    # The routing asks for an approval that no partition has recorded for every module yet.
    unapproved: bool = False
    awaiting_approval: list[str] = field(default_factory=list)
    breaker: str | None = None

    @property
    def progress(self) -> float:
        total = self.published + self.remaining
        return 1.0 if total == 0 else self.published / total

    def plain(self) -> dict[str, Any]:
        return {**asdict(self), "progress": round(self.progress, 4)}


async def gather(operator: Operator, *, agency: str | None = None) -> dict[str, AgencyOverview]:
    """Every configured agency (or one), from the state, input and dead-letter topics."""
    routing = operator.routing_table()
    default_rate = operator.settings.partner.default_rate_per_second
    names = [agency] if agency is not None else sorted(routing.agencies)
    found = {name: AgencyOverview(name) for name in names}
    for name, entry in found.items():
        config = routing.agency(name)
        entry.rate_per_second = (config.rate_per_second if config else None) or default_rate
    views = await operator.views()
    for view in views:
        _count_view(found, view)
    _mark_unapproved(found, routing, views)
    # Planned against the same views: a document sent meanwhile is counted once, as published
    # or as still to send, and the total of the progress bar holds still.
    plan, _ = await plan_with_fingerprints(
        operator.settings, routing, agency=agency, views=dict(enumerate(views))
    )
    for line in plan.lines:
        if (planned := found.get(line.agency_id)) is not None:
            planned.remaining += line.uploads
            planned.remaining_bytes += line.upload_bytes
    kafka = operator.settings.kafka
    for agency_id, count in (await _uncommitted_by_agency(operator, kafka.documents_topic)).items():
        if (waiting := found.get(agency_id)) is not None:
            waiting.live_backlog = count
    for agency_id, count in (await _uncommitted_by_agency(operator, kafka.manifests_topic)).items():
        if (waiting := found.get(agency_id)) is not None:
            waiting.manifest_backlog = count
    for letter in await read_dead_letters(operator.connection, kafka.dead_letter_topic):
        agency_id = (letter.key or b"").decode("utf-8", "replace").split(":", 1)[0]
        if (refused := found.get(agency_id)) is not None:
            refused.dead_letters += 1
            reasons = refused.dead_letter_reasons
            reasons[letter.reason] = reasons.get(letter.reason, 0) + 1
    return found


def _count_view(found: dict[str, AgencyOverview], view: PublishedView) -> None:
    """Add one partition's documents and controls to the agencies they belong to."""
    for name, entry in found.items():
        controls = view.agency(name)
        entry.paused = entry.paused or bool(controls and controls.paused)
        entry.backfill_paused = entry.backfill_paused or bool(controls and controls.backfill_paused)
    for building in view.buildings():
        counted = found.get(building.agency_id)
        if counted is None:
            continue
        for record in view.documents(building.agency_id, building.building_id):
            if record.status in ON_PARTNER:
                counted.published += 1
                counted.published_bytes += record.size_bytes
            elif record.status is DocStatus.UPLOADING:
                # Being sent: the dry run no longer counts it, and it is not on the partner yet.
                counted.remaining += 1
                counted.remaining_bytes += record.size_bytes
            elif record.status is DocStatus.BASELINE:
                counted.baseline += 1
            elif record.status is DocStatus.PARKED:
                counted.parked += 1
                reason = (record.parked_reason or "unknown").split(":", 1)[0]
                counted.parked_reasons[reason] = counted.parked_reasons.get(reason, 0) + 1
            if record.status is DocStatus.DELETE_HELD:
                counted.held += 1


def _mark_unapproved(
    found: dict[str, AgencyOverview], routing: RoutingTable, views: list[PublishedView]
) -> None:
    """Agencies whose first publication needs an approval that no partition has recorded."""
    for name, entry in found.items():
        config = routing.agency(name)
        if config is None or not config.needs_approval:
            continue
        approved: set[Module] = set()
        for view in views:
            if (controls := view.agency(name)) is not None:
                approved.update(controls.approved_modules)
        entry.unapproved = not config.modules <= approved


def add_replica_status(found: dict[str, AgencyOverview], status: dict[str, Any]) -> None:
    """Merge what one replica's ``/status`` knows: breakers and approvals awaited."""
    breakers = (status.get("scheduler") or {}).get("breakers") or {}
    for name, entry in found.items():
        if name in breakers:
            entry.breaker = str(breakers[name])
        entry.awaiting_approval = sorted(
            {*entry.awaiting_approval, *status.get("awaiting_approval", {}).get(name, [])}
        )


async def _uncommitted_by_agency(operator: Operator, topic: str) -> Counter[str]:
    """Records of ``topic`` after the relay's committed offsets, counted by agency (the key)."""
    reader = AIOKafkaConsumer(
        **operator.connection.options(),
        group_id=operator.settings.kafka.group_id,  # read its commits; never joins or commits
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",  # as the relay reads it: no aborted replay
    )
    await start_client(reader, operator.connection)
    counts: Counter[str] = Counter()
    try:
        await reader.topics()
        tps = [TopicPartition(topic, p) for p in sorted(reader.partitions_for_topic(topic) or ())]
        if not tps:
            return counts
        ends = await reader.end_offsets(tps)
        starts = {tp: await reader.committed(tp) or 0 for tp in tps}
        remaining = {tp for tp in tps if starts[tp] < ends[tp]}
        if not remaining:
            return counts
        reader.assign(list(remaining))
        for tp in remaining:
            reader.seek(tp, starts[tp])
        async for _, record in records_until(reader, {tp: ends[tp] for tp in remaining}):
            counts[(record.key or b"").decode("utf-8", "replace").split(":", 1)[0]] += 1
    finally:
        await reader.stop()
    return counts


def render(
    found: dict[str, AgencyOverview],
    previous: dict[str, AgencyOverview] | None = None,
    interval_s: float | None = None,
) -> str:
    """A readable view per agency; with an earlier sample, the rate measured since."""
    blocks = []
    for name, entry in sorted(found.items()):
        lines = [f"{name}{_pause_note(entry)}"]
        total = entry.published + entry.remaining
        total_bytes = entry.published_bytes + entry.remaining_bytes
        lines.append(
            f"  first publication  {_bar(entry.progress)} {entry.progress:4.0%}  "
            f"{entry.published} of {total} documents, "
            f"{_size(entry.published_bytes)} of {_size(total_bytes)}"
        )
        before = (previous or {}).get(name)
        measured = None
        if before is not None and interval_s:
            measured = max(entry.published - before.published, 0) / interval_s
        lines.append(f"  {'':17}  {_pace(entry, measured)}")
        if entry.awaiting_approval:
            lines.append(f"  awaiting approval  {_buildings(entry.awaiting_approval)}")
        lines.append(
            f"  live backlog       {entry.live_backlog} documents, "
            f"{entry.manifest_backlog} manifest records"
        )
        lines.append(f"  held withdrawals   {entry.held}")
        lines.append(f"  parked             {entry.parked}{_top(entry.parked_reasons)}")
        lines.append(f"  dead letters       {entry.dead_letters}{_top(entry.dead_letter_reasons)}")
        if entry.breaker is not None:
            lines.append(f"  breaker            {entry.breaker}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _pause_note(entry: AgencyOverview) -> str:
    if entry.paused:
        return "  (PAUSED: nothing is sent)"
    if entry.backfill_paused:
        return "  (PAUSED, backfill only: live documents are sent)"
    return ""


def _pace(entry: AgencyOverview, measured: float | None) -> str:
    """How fast the first publication goes and how long it has left, or why it does not go."""
    if not entry.remaining:
        return "done"
    if entry.paused or entry.backfill_paused:
        what = "nothing is sent" if entry.paused else "its first publication waits"
        return f"paused: {what} until chouette-relay resume {entry.agency}"
    if entry.unapproved:
        return f"waits for approval (chouette-relay plan --agency {entry.agency})"
    at_rate = _duration(entry.remaining / entry.rate_per_second)
    configured = f"{at_rate} left at the agency's {entry.rate_per_second:g} requests/s"
    if measured is None:
        return f"{configured} (the measured rate comes with --watch)"
    if measured <= 0:
        return f"rate 0/s, nothing sent since the last refresh; {configured}"
    return (
        f"rate {measured:.1f}/s, {_duration(entry.remaining / measured)} left at that rate; "
        f"{configured}"
    )


def _bar(ratio: float, width: int = 24) -> str:
    filled = round(ratio * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _size(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _buildings(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more buildings"


def _top(reasons: dict[str, int], limit: int = 3) -> str:
    if not reasons:
        return ""
    top = sorted(reasons.items(), key=lambda item: (-item[1], item[0]))[:limit]
    return " (" + ", ".join(f"{reason} {count}" for reason, count in top) + ")"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
