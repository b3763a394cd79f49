"""The executor's window: a partition's operations wait as plain items and start as room frees up.

A plan's operations are queued as they are (no task each), per lane and agency. At most ``size``
chains run at once for the agencies that are not paused, backfill in all but a quarter of them so
that live work always finds room; live goes before backfill, and within a lane the agency running
the fewest chains goes first. A chain
runs every operation of one document key in the order planned, so an operation on a document
with unfinished work joins that document's chain, and so does a plan's record of such a document
(a ``Step``, written at its place in the chain). A late-copy check (``CopyCheck``) is queued
as partner work of its own, so it never runs beside other work on its document. A paused
agency's operations stay queued and neither take room in the window nor count as pending: only its
items are held, and its batches (so its offsets) stay unfinished.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeAlias, TypeVar

from consumer.core.planning.plan import Delete, Lane, Upload
from consumer.core.records import SourceRecord
from consumer.core.state import DocKey, DocumentRecord

_LANES = (Lane.LIVE, Lane.BACKFILL)

K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class Withdrawal:
    """A delete, with what it removes from the view: kept to park it whole if it is refused."""

    delete: Delete
    withdrawn: DocumentRecord | None


@dataclass(frozen=True, slots=True)
class CopyCheck:
    """A lookup of a document by reference that withdraws the copies the view does not record
    (a create the partner carried out late): partner work of its own, in the document's chain."""

    key: DocKey
    condominium_id: str


Entry: TypeAlias = Upload | Withdrawal | CopyCheck


@dataclass(eq=False, slots=True)
class Step:
    """Work in a document's chain that is no partner operation: a plan's record written behind
    the work queued on its document. ``future`` completes once ``run`` did."""

    run: Callable[[], Awaitable[None]]
    future: asyncio.Future[None]


@dataclass(eq=False, slots=True)
class Batch:
    """The operations one plan submitted; ``future`` completes when the last of them ends.

    It completes with the first error any of them raised (only what stops the relay, or what
    the processor sets aside, gets that far), and only once none of them is still running.
    """

    source: SourceRecord
    remaining: int
    future: asyncio.Future[None]
    error: BaseException | None = None

    def finish(self, error: BaseException | None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            if self.error is None:
                self.future.set_result(None)
            else:
                self.future.set_exception(self.error)


@dataclass(eq=False, slots=True)
class _Run:
    """Consecutive operations of one batch for one lane and agency, taken from the front."""

    batch: Batch
    entries: list[Entry | None]
    next: int = 0


@dataclass(eq=False, slots=True)
class _Room:
    """Chains running per agency, in all and in the backfill lane."""

    running: dict[str, int] = field(default_factory=dict)
    backfill: dict[str, int] = field(default_factory=dict)


Runner = Callable[[Entry, SourceRecord, bool, object], Awaitable[object]]
"""Runs one operation: the entry, its input record, whether the result of the operation before
it on the same document is given, and that result (what the next one builds on)."""


def entry_key(entry: Entry) -> DocKey:
    return entry.delete.key if isinstance(entry, Withdrawal) else entry.key


def entry_lane(entry: Entry) -> Lane:
    return entry.lane if isinstance(entry, Upload) else Lane.LIVE


class Window:
    """Queued operations of one partition and the bounded set of chains running them."""

    def __init__(
        self,
        *,
        size: int,
        run: Runner,
        paused: Callable[[], frozenset[str]],
        finished: Callable[[Entry], None],
        backfill_paused: Callable[[], frozenset[str]] = frozenset,
    ) -> None:
        if size < 1:
            raise ValueError(f"the window needs room for one chain at least, got {size}")
        self._size = size
        self._backfill_size = max(1, size - max(1, size // 4))
        self._run = run
        self._paused = paused
        self._backfill_paused = backfill_paused
        self._finished = finished
        # Per lane, agencies with queued runs in turn order (dicts keep insertion order).
        self._queues: dict[Lane, dict[str, deque[_Run]]] = {lane: {} for lane in _LANES}
        # Every key with unfinished work, and the operations (or steps) waiting behind the one
        # queued or running (None while there are none: most documents have one operation).
        self._keys: dict[DocKey, deque[tuple[Entry, Batch] | Step] | None] = {}
        self._pending: dict[tuple[str, Lane], int] = {}  # per agency and lane
        self._room = _Room()
        self._chains: set[asyncio.Task[None]] = set()

    def pending(self, *, paused: bool, lane: Lane | None = None) -> int:
        """Operations not finished, of the agencies paused (``paused``) or of the others, in
        ``lane`` or in both."""
        stopped = self._paused()
        backfill_stopped = stopped | self._backfill_paused()
        return sum(
            n
            for (agency, in_lane), n in self._pending.items()
            if (agency in (backfill_stopped if in_lane is Lane.BACKFILL else stopped)) is paused
            and lane in (None, in_lane)
        )

    def busy(self, key: DocKey) -> bool:
        """Whether work on ``key`` is queued or running."""
        return key in self._keys

    def has_followers(self, key: DocKey) -> bool:
        """Whether later operations on ``key`` wait behind the running one."""
        return bool(self._keys.get(key))

    def after(self, key: DocKey, run: Callable[[], Awaitable[None]]) -> asyncio.Future[None] | None:
        """Queue ``run`` behind the unfinished work on ``key``; None when there is none (the
        caller runs it at once). Work planned later on ``key`` waits for it in turn."""
        if key not in self._keys:
            return None
        step = Step(run, asyncio.get_running_loop().create_future())
        followers = self._keys[key] or deque()
        followers.append(step)
        self._keys[key] = followers
        return step.future

    def submit(self, entries: Iterable[Entry], *, source: SourceRecord) -> Batch:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batch = Batch(source, 0, future)
        runs: dict[tuple[Lane, str], list[Entry | None]] = {}
        for entry in entries:
            batch.remaining += 1
            key = entry_key(entry)
            counted = (key.agency_id, entry_lane(entry))
            self._pending[counted] = self._pending.get(counted, 0) + 1
            if key in self._keys:
                # Earlier work on this document is queued or running: this goes after it.
                followers = self._keys[key] or deque()
                followers.append((entry, batch))
                self._keys[key] = followers
                continue
            self._keys[key] = None
            runs.setdefault((entry_lane(entry), key.agency_id), []).append(entry)
        for (lane, agency), run in runs.items():
            self._queues[lane].setdefault(agency, deque()).append(_Run(batch, run))
        if batch.remaining == 0:
            future.set_result(None)
        self.pump()
        return batch

    def pump(self) -> None:
        """Start chains while there is room; called after a submit, a chain's end, a resume."""
        paused = self._paused()
        backfill_paused = paused | self._backfill_paused()
        # Chains held by a pause wait in the scheduler and take no room from the others.
        backfill = sum(n for a, n in self._room.backfill.items() if a not in backfill_paused)
        held = sum(n for a, n in self._room.backfill.items() if a in backfill_paused - paused)
        running = sum(n for a, n in self._room.running.items() if a not in paused) - held
        while running < self._size:
            picked = self._take(
                paused, backfill_paused, backfill_room=backfill < self._backfill_size
            )
            if picked is None:
                return
            lane, entry, batch = picked
            running += 1
            backfill += lane is Lane.BACKFILL
            self._start(lane, entry, batch)

    async def cancel_all(self) -> None:
        """Stop every chain and drop what is queued; the batches end cancelled."""
        for lanes in self._queues.values():
            for runs in lanes.values():
                for run in runs:
                    run.batch.future.cancel()
                    for entry in run.entries[run.next :]:
                        if entry is not None:
                            self._finished(entry)
            lanes.clear()
        for followers in self._keys.values():
            for follower in followers or ():
                if isinstance(follower, Step):
                    follower.future.cancel()
                    continue
                entry, batch = follower
                batch.future.cancel()
                self._finished(entry)
        chains = list(self._chains)
        for chain in chains:
            chain.cancel()
        await asyncio.gather(*chains, return_exceptions=True)
        self._keys.clear()
        self._pending.clear()

    def _take(
        self, paused: frozenset[str], backfill_paused: frozenset[str], *, backfill_room: bool
    ) -> tuple[Lane, Entry, Batch] | None:
        for lane in _LANES:
            if lane is Lane.BACKFILL and not backfill_room:
                return None
            turns = self._queues[lane]
            stopped = backfill_paused if lane is Lane.BACKFILL else paused
            # The agency running the fewest chains goes next (the earliest in turn on a tie):
            # round turns alone would fill the window with the slowest agency's work, which
            # leaves it slowest, and starve an agency whose partner answers faster.
            running = self._room.running
            agency = min(
                (a for a in turns if a not in stopped),  # paused: held as items until resumed
                key=lambda a: running.get(a, 0),
                default=None,
            )
            if agency is None:
                continue
            runs = turns.pop(agency)
            run = runs[0]
            entry = run.entries[run.next]
            run.entries[run.next] = None  # the chain holds it now
            run.next += 1
            if run.next == len(run.entries):
                runs.popleft()
            if runs:
                turns[agency] = runs  # to the back of the turn
            if entry is not None:
                return lane, entry, run.batch
        return None

    def _start(self, lane: Lane, entry: Entry, batch: Batch) -> None:
        agency = entry_key(entry).agency_id
        room = self._room
        room.running[agency] = room.running.get(agency, 0) + 1
        if lane is Lane.BACKFILL:
            room.backfill[agency] = room.backfill.get(agency, 0) + 1
        chain = asyncio.create_task(self._chain(entry, batch), name="chain")
        self._chains.add(chain)

        def ended(done: asyncio.Task[None]) -> None:
            self._chains.discard(done)
            _decrement(room.running, agency)
            if lane is Lane.BACKFILL:
                _decrement(room.backfill, agency)
            if not done.cancelled():
                self.pump()

        chain.add_done_callback(ended)

    async def _chain(self, entry: Entry, batch: Batch) -> None:
        """Run ``entry``, then whatever joined its document's chain meanwhile, in order."""
        key = entry_key(entry)
        given, result = False, None
        while True:
            try:
                outcome = await self._run(entry, batch.source, given, result)
            except asyncio.CancelledError:
                batch.future.cancel()
                self._finished(entry)  # dropped: no longer in the backlog
                raise
            except Exception as error:  # noqa: BLE001 - the batch carries it to the processor
                self._end(entry, batch, error)
                # What waited on this document would have built on the failed outcome: it fails
                # the same way, as it did when each operation awaited the one before it.
                for follower in self._keys.pop(key, None) or ():
                    if isinstance(follower, Step):
                        follower.future.set_exception(error)
                    else:
                        self._end(*follower, error)
                return
            self._end(entry, batch, None)
            if not isinstance(entry, CopyCheck):
                # What the next operation builds on; a step (below) or a check leaves it as is.
                given, result = True, outcome
            after = await self._steps(key)
            if after is None:
                return
            entry, batch = after

    async def _steps(self, key: DocKey) -> tuple[Entry, Batch] | None:
        """Run the steps next in ``key``'s chain; the operation after them, if any."""
        while followers := self._keys.get(key):
            follower = followers.popleft()
            if not isinstance(follower, Step):
                return follower
            try:
                await follower.run()
            except asyncio.CancelledError:
                follower.future.cancel()
                raise
            except Exception as error:  # noqa: BLE001 - its future carries it to the processor
                follower.future.set_exception(error)
            else:
                follower.future.set_result(None)
        del self._keys[key]
        return None

    def _end(self, entry: Entry, batch: Batch, error: BaseException | None) -> None:
        _decrement(self._pending, (entry_key(entry).agency_id, entry_lane(entry)))
        self._finished(entry)
        batch.finish(error)


def _decrement(counts: dict[K, int], counted: K) -> None:
    left = counts[counted] - 1
    if left:
        counts[counted] = left
    else:
        del counts[counted]
