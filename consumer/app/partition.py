"""One input partition's processor, wired from the settings: its executor and its processor.

The relay builds one per assigned partition once its view is restored; the ingest benchmark
builds the same, so that what it measures is what runs.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from consumer.app.processor import FindCopies, FindResend, PartitionProcessor, WriteOutcome
from consumer.core.commands import AgencyAction
from consumer.core.guard import DeletionGuard
from consumer.core.manifest import ManifestAssembler
from consumer.core.routing import RoutingTable
from consumer.core.view import PublishedView
from consumer.kafka.deadletters import DeadLetterSink
from consumer.metrics import RelayMetrics
from consumer.partner.client import ChouetteCoproClient
from consumer.partner.executor import ContentSource, OperationExecutor, RecordWriter
from consumer.partner.scheduler import RetryPolicy, Scheduler
from consumer.settings import Settings


def partition_processor(
    partition: int,
    *,
    settings: Settings,
    topics: dict[str, str],
    routing: RoutingTable,
    guard: DeletionGuard,
    view: PublishedView,
    writer: RecordWriter,
    scheduler: Scheduler,
    partner: ChouetteCoproClient,
    content: ContentSource,
    dead_letters: DeadLetterSink,
    metrics: RelayMetrics,
    on_failure: Callable[[BaseException], None],
    on_command: Callable[[AgencyAction], None] = lambda _: None,
    find_resend: FindResend | None = None,
    find_copies: FindCopies | None = None,
    write_outcome: WriteOutcome | None = None,
) -> PartitionProcessor:
    """The processor of ``partition`` over its restored ``view``."""
    s = settings
    command_key = s.kafka.commands_key()
    executor = OperationExecutor(
        view=view,
        writer=writer,
        scheduler=scheduler,
        partner=partner,
        content=content,
        dead_letters=dead_letters,
        metrics=metrics,
        document_retry=RetryPolicy(
            max_attempts=s.content.unavailable_attempts,
            base_seconds=s.content.unavailable_backoff_s,
            cap_seconds=max(s.content.unavailable_backoff_s, 300.0),
        ),
        window=s.partner.window_per_partition,
        late_copy_checks=s.partner.late_copy_checks_s,
        on_failure=on_failure,
    )
    # Due only once this returns: the caller learns the paused agencies before any runs.
    executor.schedule_late_copy_checks()
    return PartitionProcessor(
        partition=partition,
        topics=topics,
        view=view,
        assembler=ManifestAssembler(
            expiry=dt.timedelta(seconds=s.manifest.expiry_s),
            max_pending_items=s.manifest.max_pending_items,
        ),
        routing=routing,
        guard=guard,
        executor=executor,
        writer=writer,
        dead_letters=dead_letters,
        metrics=metrics,
        max_value_bytes=s.kafka.max_value_bytes,
        clock=lambda: dt.datetime.now(dt.UTC),
        on_failure=on_failure,
        max_clock_skew=dt.timedelta(seconds=s.manifest.max_clock_skew_s),
        on_command=on_command,
        find_resend=find_resend,
        find_copies=find_copies,
        command_key=None if command_key is None else command_key.get_secret_value().encode(),
        write_outcome=write_outcome,
    )
