"""The relay's Prometheus metrics, as one typed object built against an injected registry.

Names follow Prometheus conventions: the ``chouette_relay_`` prefix, base units (seconds, bytes),
``_total`` for counters, and labels drawn from small closed sets (lanes, operations, outcomes,
reasons, configured agencies, assigned partitions): never a document or building id.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from consumer.core.commands import AgencyAction, HeldAction, Refusal
from consumer.core.deadletter import DEAD_LETTER_REASONS

PREFIX = "chouette_relay"
# The agency label of what belongs to no agency of the routing (a key that names none, or an
# agency since removed): the label keeps to the configured agencies and this one value.
UNKNOWN_AGENCY = "unknown"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LOOP_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class RelayMetrics:
    build_info: Info
    events: Counter
    dead_letters: Counter
    manifests: Counter
    operations: Counter
    backlog: Gauge
    queued_inline_bytes: Gauge
    oldest_pending: Gauge
    consumer_lag: Gauge
    partner_requests: Counter
    partner_latency: Histogram
    partner_retries: Counter
    document_retries: Counter
    late_copy_checks: Counter
    unexpected_errors: Counter
    circuit_open: Gauge
    held_deletions: Gauge
    parked_documents: Gauge
    state_documents: Gauge
    restore_records: Counter
    state_records_unreadable: Counter
    restore_progress: Gauge
    partitions_ready: Gauge
    rate_share: Gauge
    first_publication_planned: Counter
    first_publication_done: Counter
    publication_planned: Gauge
    publication_done: Gauge
    commits: Counter
    agency_paused: Gauge
    awaiting_approval: Gauge
    audit_findings: Gauge
    commands: Counter
    kafka_retries: Counter
    kafka_reachable: Gauge
    last_commit: Gauge
    event_loop_lag: Gauge
    event_loop_tick_lag: Histogram
    agencies: frozenset[str]

    @classmethod
    def create(
        cls, registry: CollectorRegistry, *, version: str, agencies: Iterable[str] = ()
    ) -> RelayMetrics:
        def name(short: str) -> str:
            return f"{PREFIX}_{short}"

        metrics = cls(
            build_info=Info(name("build"), "Version of the running relay.", registry=registry),
            events=Counter(
                name("events"),
                "Input events by topic kind and outcome (upload, skip, filtered, superseded, ...).",
                ["kind", "outcome"],
                registry=registry,
            ),
            dead_letters=Counter(
                name("dead_letters"),
                "Input records sent to the dead-letter topic, by agency (of the record's key, "
                f"{UNKNOWN_AGENCY!r} when the routing has none such) and reason.",
                ["agency", "reason"],
                registry=registry,
            ),
            manifests=Counter(
                name("manifests"),
                "Manifest parts and snapshots by assembly outcome (complete, expired, ...).",
                ["outcome"],
                registry=registry,
            ),
            operations=Counter(
                name("operations"),
                "Partner operations finished, by lane, operation and outcome.",
                ["lane", "operation", "outcome"],
                registry=registry,
            ),
            backlog=Gauge(
                name("backlog_operations"),
                "Partner operations waiting or running, by lane and operation.",
                ["lane", "operation"],
                registry=registry,
            ),
            queued_inline_bytes=Gauge(
                name("queued_inline_bytes"),
                "Inline PDF content (base64) held by the uploads waiting or running; "
                "KAFKA__MAX_PENDING_INLINE_BYTES bounds it.",
                registry=registry,
            ),
            oldest_pending=Gauge(
                name("oldest_pending_age_seconds"),
                "Age of the oldest operation still waiting, by lane.",
                ["lane"],
                registry=registry,
            ),
            consumer_lag=Gauge(
                name("consumer_lag_records"),
                "Records between the committed offset and the end of each assigned partition.",
                ["topic", "partition"],
                registry=registry,
            ),
            partner_requests=Counter(
                name("partner_requests"),
                "HTTP requests to ChouetteCopro by operation and status (code, or error).",
                ["operation", "status"],
                registry=registry,
            ),
            partner_latency=Histogram(
                name("partner_request_duration_seconds"),
                "Duration of ChouetteCopro requests.",
                ["operation"],
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            ),
            partner_retries=Counter(
                name("partner_retries"),
                "Partner operations retried, by reason.",
                ["reason"],
                registry=registry,
            ),
            document_retries=Counter(
                name("document_retries"),
                "Documents waiting on their own after a failure that is not the partner's "
                "(the document store unavailable), by reason.",
                ["reason"],
                registry=registry,
            ),
            late_copy_checks=Counter(
                name("late_copy_checks"),
                "Lookups of a document sent again after an in-doubt create, made to find a copy "
                "the partner created late: found (a second copy withdrawn), clean, failed.",
                ["outcome"],
                registry=registry,
            ),
            unexpected_errors=Counter(
                name("unexpected_errors"),
                "Exceptions no edge foresaw, by scope: a document parked, a record dead-lettered.",
                ["scope"],
                registry=registry,
            ),
            circuit_open=Gauge(
                name("circuit_open"),
                "1 while the circuit breaker of an agency is open (its calls are paused).",
                ["agency"],
                registry=registry,
            ),
            held_deletions=Gauge(
                name("held_deletions"),
                "Withdrawals held by the mass-deletion guard, awaiting an operator.",
                ["agency"],
                registry=registry,
            ),
            parked_documents=Gauge(
                name("parked_documents"),
                "Documents parked until an operator fixes configuration, by agency and reason.",
                ["agency", "reason"],
                registry=registry,
            ),
            state_documents=Gauge(
                name("state_documents"),
                "Documents in the published view, by status.",
                ["status"],
                registry=registry,
            ),
            restore_records=Counter(
                name("restore_records"),
                "Changelog records applied while restoring the published view.",
                registry=registry,
            ),
            state_records_unreadable=Counter(
                name("state_records_unreadable"),
                "State records restore could not read and skipped (their documents are looked "
                "up on the partner again).",
                ["partition"],
                registry=registry,
            ),
            restore_progress=Gauge(
                name("restore_progress_ratio"),
                "Share of each assigned partition's changelog restored (1 when ready).",
                ["partition"],
                registry=registry,
            ),
            partitions_ready=Gauge(
                name("partitions_ready"),
                "Assigned input partitions whose view is restored and which are consuming.",
                registry=registry,
            ),
            rate_share=Gauge(
                name("rate_share"),
                "Part of every agency's partner rate this replica sends at: its share of the "
                "input partitions.",
                registry=registry,
            ),
            first_publication_planned=Counter(
                name("first_publication_planned_operations"),
                "Backfill operations planned by first publications and later manifests, by agency.",
                ["agency"],
                registry=registry,
            ),
            first_publication_done=Counter(
                name("first_publication_done_operations"),
                "Backfill operations finished, by agency.",
                ["agency"],
                registry=registry,
            ),
            publication_planned=Gauge(
                name("first_publication_planned_documents"),
                "Documents of each agency on the partner, being sent, or that manifests awaiting "
                "approval would send, in this replica's partitions: the total of a first "
                "publication's progress, as status shows it.",
                ["agency"],
                registry=registry,
            ),
            publication_done=Gauge(
                name("first_publication_done_documents"),
                "Documents of each agency on the partner, in this replica's views: the done part "
                "of a first publication's progress, as status shows it.",
                ["agency"],
                registry=registry,
            ),
            commits=Counter(
                name("offset_commits"), "Input offset commits made.", registry=registry
            ),
            agency_paused=Gauge(
                name("agency_paused"),
                "1 while an operator has paused an agency in this scope (live_and_backfill: "
                "nothing of it is sent; backfill: its first publication waits).",
                ["agency", "scope"],
                registry=registry,
            ),
            awaiting_approval=Gauge(
                name("first_publication_awaiting_approval_buildings"),
                "Buildings whose first publication (history or since) waits for an approval.",
                ["agency"],
                registry=registry,
            ),
            audit_findings=Gauge(
                name("audit_findings"),
                "Differences the last audit run through this replica found, by agency and kind "
                "(missing, unexpected, changed).",
                ["agency", "kind"],
                registry=registry,
            ),
            commands=Counter(
                name("commands"),
                "Operator commands read from the commands topic by the replica owning their "
                "partition, by kind and outcome (carried_out, dead_lettered, or why it was "
                "refused: unsigned, bad_signature, unknown_agency, unknown_building, "
                "plan_changed, plan_unchecked).",
                ["kind", "outcome"],
                registry=registry,
            ),
            kafka_retries=Counter(
                name("kafka_retries"),
                "Kafka writes sent again and commits that failed, by operation.",
                ["operation"],
                registry=registry,
            ),
            kafka_reachable=Gauge(
                name("kafka_reachable"),
                "1 while the broker answered recently, 0 during an outage (the relay waits).",
                registry=registry,
            ),
            last_commit=Gauge(
                name("last_offset_commit_timestamp_seconds"),
                "Unix time of the last commit that moved an input offset forward "
                "(the start of the process until then).",
                registry=registry,
            ),
            event_loop_lag=Gauge(
                name("event_loop_lag_seconds"),
                "How late the latest periodic tick of the event loop fired: how long something "
                "held the loop (every timer, probe and answer waits as long).",
                registry=registry,
            ),
            event_loop_tick_lag=Histogram(
                name("event_loop_tick_lag_seconds"),
                "How late each periodic tick of the event loop fired, also between scrapes.",
                buckets=_LOOP_LAG_BUCKETS,
                registry=registry,
            ),
            agencies=frozenset(agencies),
        )
        metrics.build_info.info({"version": version, "python": platform.python_version()})
        # Known label values start at 0 so that increase() sees the first event after a restart.
        for agency in (*metrics.agencies, UNKNOWN_AGENCY):
            for reason in DEAD_LETTER_REASONS:
                metrics.dead_letters.labels(agency, reason)
        metrics.manifests.labels("expired")
        for operation in ("changelog", "dead_letter", "commit"):
            metrics.kafka_retries.labels(operation)
        metrics.kafka_reachable.set(1)
        for kind in (*HeldAction, *AgencyAction):
            for outcome in (
                "carried_out",
                Refusal.UNSIGNED,
                Refusal.BAD_SIGNATURE,
                Refusal.UNKNOWN_AGENCY,
                Refusal.UNKNOWN_BUILDING,
            ):
                metrics.commands.labels(kind.value, outcome)
        for outcome in (Refusal.PLAN_CHANGED, Refusal.PLAN_UNCHECKED):
            metrics.commands.labels(AgencyAction.APPROVE.value, outcome)
        metrics.commands.labels("unreadable", "dead_lettered")
        for outcome in ("found", "clean", "failed"):
            metrics.late_copy_checks.labels(outcome)
        for scope in ("document", "record"):
            metrics.unexpected_errors.labels(scope)
        # A relay that never commits is stalled from its start, not since 1970.
        metrics.last_commit.set_to_current_time()
        return metrics

    def agency_label(self, agency_id: str | None) -> str:
        """The agency label for ``agency_id``: itself when the routing names it, else
        ``UNKNOWN_AGENCY`` (what comes from outside never widens the label's set)."""
        return agency_id if agency_id in self.agencies else UNKNOWN_AGENCY
