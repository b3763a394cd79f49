"""When a plan's work is done: its records written, its operations acknowledged, its building
record made durable last, and only then its input offsets released.

``PlanCompletion`` is the half of ``PartitionProcessor`` (which inherits it) that submits a
plan and keeps its offsets open until every piece of work it caused is acknowledged.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from consumer.core.offsets import OffsetTracker
from consumer.core.planning.plan import Plan
from consumer.core.records import SourceRecord
from consumer.core.state import BuildingRecord, StateRecord
from consumer.core.view import PublishedView
from consumer.partner.executor import OperationExecutor, RecordWriter
from consumer.partner.window import Batch

DecidedWait = tuple[tuple[str, str], list[tuple[str, int]], asyncio.Future[Any]]
"""A wait for a building's work: the building, the offsets it releases, the wait itself."""

# A plan's records written together: one chunk's acknowledgements awaited at a time.
WRITE_CHUNK = 500


async def _write_all(writer: RecordWriter, records: list[StateRecord]) -> None:
    """Write ``records`` in order, a chunk at a time: a plan of any size (a 100,000-item
    manifest) costs one chunk of waiting writes, not a task per record."""
    for start in range(0, len(records), WRITE_CHUNK):
        await asyncio.gather(*(writer.write(r) for r in records[start : start + WRITE_CHUNK]))


def _all_of(futures: list[asyncio.Future[None]]) -> asyncio.Future[None]:
    """One future that ends when all of ``futures`` have (failed as the first failure)."""
    gathered = asyncio.gather(*futures)
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def finish(all_done: asyncio.Future[list[None]]) -> None:
        if done.done():
            return
        if all_done.cancelled():
            done.cancel()
        elif (error := all_done.exception()) is not None:
            done.set_exception(error)
        else:
            done.set_result(None)

    gathered.add_done_callback(finish)
    return done


class PlanCompletion:
    """The completion half of ``PartitionProcessor``."""

    view: PublishedView
    _executor: OperationExecutor
    _writer: RecordWriter
    _trackers: dict[str, OffsetTracker]
    _completions: set[asyncio.Future[None]]
    _building_work: dict[tuple[str, str], set[asyncio.Future[None]]]
    # The latest wait for a building's work: its building and offsets (_release_after_building)
    _decided_wait: DecidedWait | None
    _on_failure: Callable[[BaseException], None]

    async def _set_aside(self, source: SourceRecord, error: Exception) -> None:
        raise NotImplementedError

    def _execute(
        self,
        plan: Plan,
        source: SourceRecord,
        offsets: Iterable[tuple[str, int]],
        *,
        decided_by: tuple[str, str] | None = None,
    ) -> None:
        """Apply and write the plan's records, submit its operations, and release ``offsets``
        (each opened by ``begin`` when read) once all of that is acknowledged.

        A plan of operations alone (a document's upload, the common case) waits as its batch's
        future, with no task of its own: held work costs its items, not coroutines.
        ``decided_by``: the building whose manifest decided the plan (a document it supersedes,
        or one that waits for its hold); the offsets wait for that building's work too, so that
        a crash before the manifest is recorded reads the document again with the manifest.
        """
        held = list(offsets)
        building_wide = list(self._building_work.get(decided_by, ())) if decided_by else []
        writes, now, deferred = self._apply_records(plan)
        if (
            now
            and not (writes or deferred or building_wide or plan.operations or plan.marks)
            and len(now) <= WRITE_CHUNK
        ):
            self._write_alone(now, held, source)
            return
        if now:
            writes.append(_write_all(self._writer, now))
        batch = self._executor.submit(plan.operations, source=source) if plan.operations else None
        if plan.marks:
            self._executor.mark(plan.marks)  # on the uploads queued so far, this plan's included
        completion: asyncio.Future[None]
        places = {(r.agency_id, r.building_id) for r in deferred}
        if writes or deferred or building_wide:
            earlier = [work for place in places for work in self._building_work.get(place, ())]
            earlier += building_wide
            completion = asyncio.create_task(
                self._complete(
                    writes, batch, deferred=deferred, offsets=held, earlier=earlier, source=source
                )
            )
            completion.add_done_callback(self._forget_completion)
        elif batch is not None:
            completion = batch.future
            completion.add_done_callback(functools.partial(self._batch_done, held, source))
        else:
            for topic, offset in held:
                self._trackers[topic].done(offset)
            return
        places |= {(op.key.agency_id, op.key.building_id) for op in plan.operations}
        for place in places:
            self._building_work.setdefault(place, set()).add(completion)
            self._decided_wait = None  # work was added: a later event waits for it too
        self._completions.add(completion)
        completion.add_done_callback(self._forget_work)

    def _release_after_building(
        self, place: tuple[str, str], offsets: list[tuple[str, int]]
    ) -> None:
        """Release ``offsets`` (of an event a manifest decided, with nothing to do) once the
        building's work queued now is done. Events read in a row share one wait until more
        work is queued: re-reading a backlog behind a first publication costs no task each."""
        wait = self._decided_wait
        if wait is None or wait[0] != place or wait[2].done():
            gathered = asyncio.gather(*self._building_work[place], return_exceptions=True)
            wait = self._decided_wait = (place, [], gathered)
            waiting = wait[1]

            def release(done: asyncio.Future[list[BaseException | None]]) -> None:
                # Work cancelled: the partition closed, and the events are read again.
                if not done.cancelled() and not any(
                    isinstance(outcome, asyncio.CancelledError) for outcome in done.result()
                ):
                    self._release(waiting)

            gathered.add_done_callback(release)
        wait[1].extend(offsets)

    def _apply_records(
        self, plan: Plan
    ) -> tuple[list[Awaitable[object]], list[StateRecord], list[BuildingRecord]]:
        """Apply ``plan``'s records to the view and sort their writes: queued behind their
        document's work, to write at once, or deferred (a building record)."""
        writes: list[Awaitable[object]] = []
        now: list[StateRecord] = []  # records with no work queued on their document
        deferred: list[BuildingRecord] = []
        for record in plan.records:
            self.view.apply(record)
            if isinstance(record, BuildingRecord) and (
                plan.operations or self._building_work.get((record.agency_id, record.building_id))
            ):
                # "This manifest is applied" becomes durable only once the operations it counted
                # on are: its own, and those already queued for the building (the view shows them
                # done). A crash before that reads the manifest again instead of judging it
                # stale, and the events behind those operations are not judged decided by it.
                deferred.append(record)
            else:
                # Behind the work already queued on its document, if any: in that order on disk.
                queued = self._executor.queue_after(record)
                if queued is None:
                    now.append(record)
                else:
                    writes.append(queued)
        return writes, now, deferred

    def _write_alone(
        self, records: list[StateRecord], offsets: list[tuple[str, int]], source: SourceRecord
    ) -> None:
        """The common plan of ingest (a document's record, nothing to send or wait for): its
        records' acknowledgements are its completion, with no task of its own."""
        submitted = [self._writer.submit(record) for record in records]
        written = submitted[0] if len(submitted) == 1 else _all_of(submitted)
        written.add_done_callback(functools.partial(self._batch_done, offsets, source))
        self._completions.add(written)
        written.add_done_callback(self._forget_work)

    async def _complete(
        self,
        writes: list[Awaitable[object]],
        batch: Batch | None,
        *,
        deferred: list[BuildingRecord],
        offsets: list[tuple[str, int]],
        earlier: list[asyncio.Future[None]],
        source: SourceRecord,
    ) -> None:
        try:
            await asyncio.gather(*writes, *([batch.future] if batch else []))
        except Exception as error:  # noqa: BLE001 - classify() decides; fatal is raised again
            await self._set_aside(source, error)
        if earlier:
            # Earlier work of the building (a manifest's uploads, a document's) it counted on.
            await asyncio.gather(*earlier, return_exceptions=True)
        for record in deferred:
            await self._writer.write(record)
        self._release(offsets)

    def _batch_done(
        self, offsets: list[tuple[str, int]], source: SourceRecord, done: asyncio.Future[None]
    ) -> None:
        """A plan of operations alone ended: release its offsets, or set its record aside."""
        if done.cancelled():
            return  # the partition closed: its offsets stay open and are read again
        error = done.exception()
        if error is None:
            self._release(offsets)
            return
        aside = asyncio.create_task(self._aside_and_release(source, error, offsets))
        self._completions.add(aside)
        aside.add_done_callback(self._forget_completion)
        aside.add_done_callback(self._forget_work)

    async def _aside_and_release(
        self, source: SourceRecord, error: BaseException, offsets: list[tuple[str, int]]
    ) -> None:
        if not isinstance(error, Exception):
            raise error
        await self._set_aside(source, error)
        self._release(offsets)

    def _release(self, offsets: list[tuple[str, int]]) -> None:
        for topic, offset in offsets:
            self._trackers[topic].done(offset)

    def _forget_completion(self, task: asyncio.Future[None]) -> None:
        if not task.cancelled() and (error := task.exception()) is not None:
            # Only infrastructure gets here (the changelog unreachable): the work would hold its
            # offsets forever, so stop instead and let the restart redo it from the commit.
            self._on_failure(error)

    def _forget_work(self, work: asyncio.Future[None]) -> None:
        self._completions.discard(work)
        for place, pending in list(self._building_work.items()):
            pending.discard(work)
            if not pending:
                del self._building_work[place]

    def resume(self) -> None:
        """The paused agencies changed: start the work that may run now."""
        self._executor.resume()

    async def close(self) -> None:
        """Stop this partition's work; unfinished offsets stay uncommitted and are read again."""
        await self._executor.cancel_all()
        for task in list(self._completions):
            task.cancel()
        await asyncio.gather(*self._completions, return_exceptions=True)
