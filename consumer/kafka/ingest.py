"""The Kafka side of the relay: one consumer group on both input topics, manual commits.

The rebalance listener only records an assignment and pauses the new partitions: each newly
assigned partition number then starts in a task of its own, owned by the ingest loop's task group,
which restores its view from the changelog (and settles its upload intents) before it resumes
reading it. Partitions start concurrently, one's trouble never holds another, and a start that
fails reaches the relay's failure path (aiokafka logs and swallows what a listener raises). On
revocation in-flight work is stopped and what is finished is committed. Offsets are committed
periodically, each up to the lowest unfinished record; a commit that fails (the broker away) is
simply made again, with newer offsets, on the next interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Generic, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from consumer.core.records import SourceRecord
from consumer.errors import KafkaUnavailableError
from consumer.kafka.brokerwatch import BrokerWatch
from consumer.metrics import RelayMetrics

log = logging.getLogger(__name__)


class PartitionWork(Protocol):
    """What ingest needs of a partition's processor; the composition root supplies the real one."""

    @property
    def pending_operations(self) -> int: ...

    @property
    def pending_by_lane(self) -> tuple[int, int]: ...

    @property
    def pending_inline_bytes(self) -> int: ...

    @property
    def manifests_topic(self) -> str: ...

    def committable(self) -> dict[str, int]: ...

    async def handle_batch(self, sources: Iterable[SourceRecord]) -> None: ...

    def expire(self, *, caught_up: bool) -> None: ...

    async def close(self) -> None: ...


P = TypeVar("P", bound=PartitionWork)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(self, ingest: Ingest[Any]) -> None:
        self._ingest = ingest

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._ingest.revoke({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._ingest.assign({tp.partition for tp in assigned})


class Ingest(Generic[P]):
    """Reads both input topics and routes each record to its partition's processor."""

    def __init__(
        self,
        *,
        consumer: AIOKafkaConsumer,
        topics: list[str],
        processor_factory: Callable[[int], Awaitable[P]],
        metrics: RelayMetrics,
        commit_interval_s: float,
        max_records: int,
        watch: BrokerWatch,
        probe: Callable[[], Awaitable[object]],
        on_unavailable: Callable[[BaseException], None],
        max_pending: tuple[int, int] = (20_000, 100_000),
        max_pending_total: int = 200_000,
        max_pending_inline_bytes: int = 256 * 1024 * 1024,
        on_assignment: Callable[[set[int]], None] = lambda owned: None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._consumer = consumer
        self._on_failure = on_failure or on_unavailable
        self._on_assignment = on_assignment
        self._topics = topics
        self._factory = processor_factory
        self._metrics = metrics
        self._commit_interval_s = commit_interval_s
        self._max_records = max_records
        self._max_live, self._max_backfill = max_pending
        self._max_total = max_pending_total
        self._max_inline = max_pending_inline_bytes
        self._watch = watch
        self._probe = probe
        self._on_unavailable = on_unavailable
        # A commit waits this long at most: aiokafka retries it for as long as the group
        # coordinator is unknown, which during an outage is forever.
        self._commit_timeout_s = max(commit_interval_s, 5.0)
        self.processors: dict[int, P] = {}
        self._assigned: set[int] = set()
        # Partitions assigned whose processor is still being built (restore, reconcile), and the
        # task group that owns those starts while the loop runs (None before and after).
        self._starting: dict[int, asyncio.Task[None] | None] = {}
        self._tasks: asyncio.TaskGroup | None = None
        self._committed: dict[TopicPartition, int] = {}
        self._consuming = False
        # The replica's queued work reached max_pending_total, or its inline content
        # max_pending_inline_bytes.
        self._over_budget = False
        # True until the group assigned partitions (possibly none), and again while it rebalances.
        self._rebalancing = True
        self._stopping = asyncio.Event()

    @property
    def ready(self) -> bool:
        """Every assigned partition is restored, the loop is consuming and Kafka answers."""
        return (
            self._consuming
            and not self._rebalancing
            and self._assigned == set(self.processors)
            and self._watch.reachable
        )

    def subscribe(self) -> None:
        self._consumer.subscribe(self._topics, listener=_Rebalance(self))

    def assign(self, partitions: set[int]) -> None:
        """Record an assignment: pause the new partitions and start each in a task of its own."""
        self._assigned = set(partitions)
        self._on_assignment(set(partitions))  # before any new partition's work starts
        new = sorted(partitions - set(self.processors) - set(self._starting))
        if new:
            self._consumer.pause(*self._partitions_of(new))
        for partition in new:
            self._starting[partition] = None
            self._spawn(partition)
        self._rebalancing = False
        if partitions:
            log.info("partitions assigned", extra={"partitions": sorted(partitions)})
        else:
            log.info("no partition assigned: more replicas than input partitions")

    def _spawn(self, partition: int) -> None:
        """Start ``partition`` under the loop's task group; before the loop runs, it does."""
        if self._tasks is not None and self._starting.get(partition, False) is None:
            self._starting[partition] = self._tasks.create_task(
                self._start(partition), name=f"partition-{partition}"
            )

    async def _start(self, partition: int) -> None:
        """Build ``partition``'s processor (its view restored, its intents settled), then read it.

        Whatever the factory raises goes to the relay's failure path, which stops the relay: a
        partition that cannot be restored must not be consumed as if it were empty.
        """
        try:
            processor = await self._factory(partition)
        except Exception as error:  # noqa: BLE001 - reported to the one failure path, which stops
            error.add_note(f"while restoring input partition {partition}")
            self._on_failure(error)
            return
        if partition not in self._assigned or partition not in self._starting:
            await processor.close()  # revoked meanwhile: the next owner restores it again
            return
        del self._starting[partition]
        self.processors[partition] = processor
        assignment = self._consumer.assignment()
        self._consumer.resume(*(tp for tp in self._partitions_of([partition]) if tp in assignment))
        self._metrics.partitions_ready.set(len(self.processors))
        log.info("partition ready", extra={"partition": partition})

    def _partitions_of(self, partitions: Iterable[int]) -> list[TopicPartition]:
        return [TopicPartition(topic, p) for p in partitions for topic in self._topics]

    async def revoke(self, partitions: set[int]) -> None:
        self._rebalancing = True
        starts = [self._starting.pop(p) for p in sorted(partitions & set(self._starting))]
        for task in starts:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(task for task in starts if task is not None), return_exceptions=True)
        leaving = sorted(partitions & set(self.processors))
        for partition in leaving:
            await self.processors[partition].close()
        # What these partitions finished is committed before they go: the next owner starts there.
        await self.commit()
        for partition in leaving:
            del self.processors[partition]
        self._assigned -= partitions
        if self._assigned:
            self._on_assignment(set(self._assigned))
        self._forget_lag(partitions)
        self._metrics.partitions_ready.set(len(self.processors))
        if partitions:
            log.info("partitions revoked", extra={"partitions": sorted(partitions)})

    async def run(self) -> None:
        """Consume until ``stop`` is called; the partitions' starts run under this loop."""
        self._consuming = True
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                for partition in list(self._starting):
                    self._spawn(partition)  # assigned before the loop ran
                while not self._stopping.is_set():
                    batches = await self._consumer.getmany(
                        timeout_ms=200, max_records=self._max_records
                    )
                    for tp, records in batches.items():
                        processor = self.processors.get(tp.partition)
                        if processor is None:
                            self._refetch_later(tp, records[0].offset)
                            continue
                        await processor.handle_batch(map(_source, records))
                    self._apply_backpressure()
                for task in self._starting.values():
                    if task is not None:
                        task.cancel()  # stopping: a restore under way is done again next time
        finally:
            self._tasks = None
            self._consuming = False

    async def run_housekeeping(self) -> None:
        """Commit, expire incomplete manifests, refresh lag and watch the broker, on an interval.

        A broker silent for longer than the bound is reported to ``on_unavailable`` (once), which
        stops the relay; a shorter silence only makes the relay unready.
        """
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self._commit_interval_s)
            for partition, processor in list(self.processors.items()):
                tp = TopicPartition(processor.manifests_topic, partition)
                processor.expire(caught_up=await self._caught_up(tp))
            await self.commit()
            await self._update_lag()
            if self._watch.silence_s() > self._watch.window_s / 2:
                # Nothing else showed the broker answers (an idle relay commits nothing): ask it.
                await self._watch.probe(self._probe, timeout_s=self._commit_timeout_s)
            try:
                self._watch.check()
            except KafkaUnavailableError as exc:
                self._on_unavailable(exc)
                return

    def stop(self) -> None:
        self._stopping.set()

    async def _caught_up(self, tp: TopicPartition) -> bool:
        """Whether every record of ``tp`` published so far has been handed to its processor."""
        if tp not in self._consumer.assignment():
            return False
        highwater = self._consumer.highwater(tp)
        if highwater is None:  # nothing fetched yet: the position may still be looked up
            return False
        try:
            position = await asyncio.wait_for(self._consumer.position(tp), timeout=1.0)
        except (TimeoutError, IllegalStateError):
            return False
        return bool(position >= highwater)

    async def commit(self) -> None:
        offsets: dict[TopicPartition, int] = {}
        assignment = self._consumer.assignment()
        for partition, processor in self.processors.items():
            for topic, offset in processor.committable().items():
                tp = TopicPartition(topic, partition)
                if tp in assignment:
                    offsets[tp] = offset
        if not offsets:
            return
        try:
            await asyncio.wait_for(self._consumer.commit(offsets), timeout=self._commit_timeout_s)
            # Commits repeat while work is stuck: only an offset moving forward is progress.
            if any(self._committed.get(tp) != offset for tp, offset in offsets.items()):
                self._metrics.last_commit.set_to_current_time()
            self._committed.update(offsets)
        except (CommitFailedError, KafkaError, TimeoutError) as exc:
            # A rebalance is under way (the next owner reads from the last committed offset), or
            # the broker is away: the next interval commits again, from the offsets of then.
            self._metrics.kafka_retries.labels("commit").inc()
            log.warning("offset commit failed", extra={"error": repr(exc)})
        else:
            self._metrics.commits.inc()
            self._watch.touch()

    async def shutdown(self, drain_timeout_s: float) -> None:
        """Let in-flight work finish within the deadline, then commit and stop processors."""
        deadline = asyncio.get_running_loop().time() + drain_timeout_s
        while asyncio.get_running_loop().time() < deadline:
            if all(p.pending_operations == 0 for p in self.processors.values()):
                break
            await asyncio.sleep(0.1)
        await self.commit()
        for processor in list(self.processors.values()):
            await processor.close()
        await self.commit()

    def _refetch_later(self, tp: TopicPartition, offset: int) -> None:
        """Records of a partition whose view is not restored yet (aiokafka may fetch for a new
        assignment while it is restored) are read again later; revoked ones are the new owner's.
        """
        if tp in self._consumer.assignment():
            self._consumer.seek(tp, offset)

    @property
    def over_budget(self) -> bool:
        """Whether the replica's queued work reached ``max_pending_total`` or its queued inline
        content ``max_pending_inline_bytes`` (``/status``)."""
        return self._over_budget

    def reading_paused(self, partition: int) -> bool:
        """Whether back-pressure paused reading ``partition`` (``/status``)."""
        paused = self._consumer.paused()
        return any(TopicPartition(topic, partition) in paused for topic in self._topics)

    def _apply_backpressure(self) -> None:
        """Pause reading a partition whose live or backfill work reached its bound; resume once
        both are under half of it. Each lane has its own bound, so a first publication's queued
        backfill (rate-limited, hours long) never stops the partition's live documents.

        Over them, one budget for the replica: while the work of every partition together
        reaches ``max_pending_total``, the partitions that hold some are paused too (those with
        none keep reading); they resume once the total is under half of it. The inline content
        of queued uploads has a budget of its own, ``max_pending_inline_bytes`` (a document's
        PDF may come inline, up to a record's size): paused agencies' uploads count there, since
        they hold their bytes as long as they wait.
        """
        pending = {p: processor.pending_by_lane for p, processor in self.processors.items()}
        inline = {p: processor.pending_inline_bytes for p, processor in self.processors.items()}
        total = sum(live + backfill for live, backfill in pending.values())
        inline_total = sum(inline.values())
        if total >= self._max_total or inline_total >= self._max_inline:
            self._over_budget = True
        elif total < self._max_total // 2 and inline_total < self._max_inline // 2:
            self._over_budget = False
        for partition, (live, backfill) in pending.items():
            tps = [TopicPartition(topic, partition) for topic in self._topics]
            holds_work = live + backfill > 0 or inline[partition] > 0
            if (
                live >= self._max_live
                or backfill >= self._max_backfill
                or (self._over_budget and holds_work)
            ):
                self._consumer.pause(*tps)
            elif (
                live < self._max_live // 2
                and backfill < self._max_backfill // 2
                and not (self._over_budget and holds_work)
                and self.reading_paused(partition)
            ):
                self._consumer.resume(*tps)

    def _forget_lag(self, partitions: set[int]) -> None:
        """Revoked partitions are another replica's to report: a frozen lag would sum twice."""
        for topic in self._topics:
            for partition in partitions:
                with contextlib.suppress(KeyError):
                    self._metrics.consumer_lag.remove(topic, str(partition))

    async def _update_lag(self) -> None:
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            processor = self.processors.get(tp.partition)
            if highwater is None or processor is None:
                continue
            committed = processor.committable().get(tp.topic)
            if committed is None:
                # Nothing read since the assignment: work resumes at the consumer's position, and
                # a replica stuck before its first record must still show what waits.
                try:
                    committed = await self._consumer.position(tp)
                except KafkaError:
                    continue  # revoked meanwhile; the next round sees the new assignment
            self._metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                max(highwater - committed, 0)
            )


def _source(record: Any) -> SourceRecord:
    headers = record.headers
    if type(headers) is not tuple:  # aiokafka hands out a tuple already
        headers = tuple(headers or ())
    return SourceRecord(
        record.topic,
        record.partition,
        record.offset,
        record.timestamp,
        record.key,
        record.value,
        headers,
    )
