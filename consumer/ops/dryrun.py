"""The dry run of a first publication: what the relay would send, and how long it would take.

Reads the manifest topic from the beginning and the relay's state topic (no consumer group, no
commit, nothing produced), keeps the newest complete manifest of every building, and plans it
against the current view without applying anything. Nothing is sent to the partner. Each agency's
plan has a fingerprint (a digest of every document its waiting first publications would send,
record or withdraw, one share per input partition, and of the agency's mode): an operator approves
that fingerprint, and an approval is refused once the plan it was given for has changed, by the
command line and again by each replica for its own share.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.core.decoding import decode_record
from consumer.core.events import ManifestSnapshot
from consumer.core.guard import DeletionGuard
from consumer.core.manifest import CompleteManifest, ManifestAssembler
from consumer.core.planning.first_publication import (
    DryRun,
    awaiting_share,
    plan_fingerprint,
    plan_first_publication,
)
from consumer.core.routing import RoutingTable, load_routing
from consumer.core.view import PublishedView
from consumer.errors import ConfigError
from consumer.kafka.changelog import restore_partition, topic_partitions
from consumer.kafka.connection import KafkaConnection, kafka_connection
from consumer.kafka.reading import records_until
from consumer.kafka.startup import start_client
from consumer.settings import Settings


async def latest_manifests(
    settings: Settings, connection: KafkaConnection, *, agency: str | None
) -> dict[int, dict[tuple[str, str], CompleteManifest]]:
    """Newest complete manifest per building, grouped by partition number."""
    topic = settings.kafka.manifests_topic
    # Asked of the broker: a client's bootstrap metadata need not list every topic.
    partitions = await topic_partitions(connection, topic)
    if not partitions:
        raise ConfigError(f"manifest topic {topic!r} not found")
    reader = AIOKafkaConsumer(
        **connection.options(),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",  # as the relay reads it: no aborted replay
        fetch_max_bytes=max(settings.kafka.max_value_bytes * 4, 52_428_800),
        max_partition_fetch_bytes=max(settings.kafka.max_value_bytes * 2, 1_048_576),
    )
    await start_client(reader, connection)
    found: dict[int, dict[tuple[str, str], CompleteManifest]] = defaultdict(dict)
    # The relay dead-letters manifests from beyond the clock skew; the plan must not count them.
    not_after = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=settings.manifest.max_clock_skew_s)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        reader.assign(tps)
        ends = await reader.end_offsets(tps)
        await reader.seek_to_beginning(*tps)
        assemblers = {
            tp.partition: ManifestAssembler(
                expiry=dt.timedelta(days=3650),
                max_pending_items=settings.manifest.max_pending_items,
            )
            for tp in tps
        }
        async for tp, record in records_until(reader, ends, timeout_ms=1000):
            _take(
                record,
                assemblers[tp.partition],
                found[tp.partition],
                agency=agency,
                max_value_bytes=settings.kafka.max_value_bytes,
                not_after=not_after,
            )
    finally:
        await reader.stop()
    return found


def _take(
    record: Any,
    assembler: ManifestAssembler,
    found: dict[tuple[str, str], CompleteManifest],
    *,
    agency: str | None,
    max_value_bytes: int,
    not_after: dt.datetime,
) -> None:
    """Feed one manifest record to its partition's assembler; keep the newest complete one."""
    decoded = decode_record(
        topic_kind="manifest-snapshot",
        key=record.key,
        value=record.value,
        headers=tuple(record.headers or ()),
        max_value_bytes=max_value_bytes,
        not_after=not_after,
    )
    if not isinstance(decoded, ManifestSnapshot):
        return
    if agency is not None and decoded.agency_id != agency:
        return
    result = assembler.add(decoded, offset=record.offset, now=dt.datetime.now(dt.UTC))
    if result.complete is not None:
        place = (result.complete.agency_id, result.complete.building_id)
        known = found.get(place)
        if known is None or known.taken_at <= result.complete.taken_at:
            found[place] = result.complete


async def build_plan(settings: Settings, routing: RoutingTable, *, agency: str | None) -> DryRun:
    plan, _ = await plan_with_fingerprints(settings, routing, agency=agency)
    return plan


async def plan_with_fingerprints(
    settings: Settings,
    routing: RoutingTable,
    *,
    agency: str | None,
    views: Mapping[int, PublishedView] | None = None,
) -> tuple[DryRun, dict[str, str]]:
    """The dry run, and the fingerprint of each agency's part of it."""
    total, fingerprints, _ = await plan_with_shares(settings, routing, agency=agency, views=views)
    return total, fingerprints


async def plan_with_shares(
    settings: Settings,
    routing: RoutingTable,
    *,
    agency: str | None,
    views: Mapping[int, PublishedView] | None = None,
) -> tuple[DryRun, dict[str, str], dict[str, tuple[str, ...]]]:
    """The dry run, each agency's fingerprint, and the share of every input partition in it
    (what an approve carries, so that each owning replica checks its own).

    ``views``, by partition, are the state the plan is made against when the caller has read
    it already (``status`` counts what is published in the same views, so that published and
    still to send add up to the same total whatever moved between two reads); otherwise each
    partition's view is read from the state topic.
    """
    connection = kafka_connection(settings.kafka)
    manifests = await latest_manifests(settings, connection, agency=agency)
    partitions = await topic_partitions(connection, settings.kafka.manifests_topic) or 0
    guard = DeletionGuard(settings.guard.max_delete_share, settings.guard.min_deletes)
    total = DryRun()
    found = {m.agency_id for by_building in manifests.values() for m in by_building.values()}
    agencies = sorted({agency} if agency is not None else found | set(routing.agencies))
    shares: dict[str, list[str]] = {a: [] for a in agencies}
    state_exists = views is None and await topic_partitions(connection, settings.kafka.state_topic)
    for partition in range(partitions):
        by_building = manifests.get(partition, {})
        view = PublishedView()  # no state topic yet: nothing was ever published
        if views is not None:
            view = views.get(partition, view)
        elif state_exists and by_building:
            await restore_partition(
                connection=connection,
                topic=settings.kafka.state_topic,
                partition=partition,
                view=view,
            )
        newest = [manifest for _, manifest in sorted(by_building.items())]
        for manifest in newest:
            total = total + plan_first_publication(view, routing, manifest, guard)
        for agency_id in agencies:
            own = [manifest for manifest in newest if manifest.agency_id == agency_id]
            shares[agency_id].append(awaiting_share(view, routing, own, guard))
    fingerprints = {a: plan_fingerprint(routing, a, shares[a]) for a in agencies}
    return total, fingerprints, {a: tuple(shares[a]) for a in agencies}


CHANGES_EXIT_CODE = 3
"""``plan --detailed-exitcode``: there is something to send or record (0: no changes; 2 stays
the CLI's "fix this setting")."""


def has_changes(plan: DryRun) -> bool:
    """Whether applying the newest manifests would send, withdraw or record anything."""
    return bool(plan.uploads or plan.deletes or plan.baseline)


def render(
    plan: DryRun, routing: RoutingTable, default_rate: float, fingerprints: dict[str, str]
) -> str:
    if not has_changes(plan):
        whose = " and ".join(sorted(fingerprints)) or "any agency"
        return (
            f"No changes: the newest manifests of {whose} are applied; nothing to send and "
            "nothing to approve."
        )
    lines = [
        f"{'agency':<20} {'building':<14} {'module':<18} {'uploads':>8} {'MiB':>9} "
        f"{'baseline':>9} {'deletes':>8} {'held':>6} {'parked':>7}"
    ]
    per_agency: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    # Read by a person: in building order, not in the partitions' order they were found in.
    for line in sorted(plan.lines, key=lambda ln: (ln.agency_id, ln.building_id, ln.module.value)):
        lines.append(
            f"{line.agency_id:<20} {line.building_id:<14} {line.module.value:<18} "
            f"{line.uploads:>8} {line.upload_bytes / 1048576:>9.1f} {line.baseline:>9} "
            f"{line.deletes:>8} {line.held:>6} {line.parked:>7}"
        )
        totals = per_agency[line.agency_id]
        totals[0] += line.uploads
        totals[1] += line.upload_bytes
        totals[2] += line.deletes
    lines.append("")
    for agency_id, (uploads, size, deletes) in sorted(per_agency.items()):
        config = routing.agencies.get(agency_id)
        rate = config.rate_per_second if config and config.rate_per_second else default_rate
        seconds = (uploads + deletes) / rate
        lines.append(
            f"{agency_id}: {uploads} uploads ({size / 1048576:.1f} MiB), {deletes} withdrawals, "
            f"about {_duration(seconds)} at {rate:g} requests/s"
        )
    lines.append("")
    for agency_id, print_ in sorted(fingerprints.items()):
        config = routing.agency(agency_id)
        step = (
            f"; start it with: chouette-relay approve {agency_id} --plan {print_}"
            if config is not None and config.needs_approval
            else ""
        )
        lines.append(f"{agency_id}: plan {print_}{step}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


async def print_plan(
    settings: Settings, *, agency: str | None, as_json: bool, detailed_exitcode: bool = False
) -> int:
    """Print the dry run; with ``detailed_exitcode``, 0 means no changes and 3 changes."""
    if settings.routing_file is None or not settings.kafka.bootstrap_servers:
        raise ConfigError(
            "the dry run reads a real cluster: set CHOUETTE_RELAY_KAFKA__BOOTSTRAP_SERVERS and "
            "CHOUETTE_RELAY_ROUTING_FILE"
        )
    routing = load_routing(settings.routing_file)
    plan, fingerprints, shares = await plan_with_shares(settings, routing, agency=agency)
    if as_json:
        payload = plan_json(plan, fingerprints, shares)
        sys.stdout.write(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        default_rate = settings.partner.default_rate_per_second
        sys.stdout.write(render(plan, routing, default_rate, fingerprints) + "\n")
    return CHANGES_EXIT_CODE if detailed_exitcode and has_changes(plan) else 0


def plan_json(
    plan: DryRun,
    fingerprints: dict[str, str],
    shares: dict[str, tuple[str, ...]] | None = None,
) -> dict[str, Any]:
    """The dry run as JSON, for scripts and the admin endpoint; with each agency's share of
    every partition (``shares``), what an approve carries and each owning replica checks."""
    payload: dict[str, Any] = {
        "lines": [
            {
                "agency": line.agency_id,
                "building": line.building_id,
                "module": line.module.value,
                "uploads": line.uploads,
                "upload_bytes": line.upload_bytes,
                "baseline": line.baseline,
                "deletes": line.deletes,
                "held": line.held,
                "parked": line.parked,
            }
            for line in plan.lines
        ],
        "uploads": plan.uploads,
        "upload_bytes": plan.upload_bytes,
        "baseline": plan.baseline,
        "deletes": plan.deletes,
        "changes": has_changes(plan),
        "fingerprints": fingerprints,
    }
    if shares is not None:
        payload["shares"] = {agency: list(parts) for agency, parts in shares.items()}
    return payload
