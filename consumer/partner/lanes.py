"""Lanes and fairness: which queued partner job goes next, and when one may.

Each agency has a queue per lane. Workers take live work before backfill (which may use every
worker but one) and rotate between agencies with ready work, so one agency's backfill never
holds back another agency; a job goes only when its agency's breaker allows it and its token
bucket has a token, and not while an operator paused its agency (unless it sends nothing).
``LaneQueues`` is the part of the ``Scheduler`` that keeps these queues and reports their backlog.
"""

from __future__ import annotations

import asyncio
import heapq
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from consumer.core.planning.plan import Lane  # the lanes are the planner's: live before backfill
from consumer.partner.attempts import SchedulerObserver
from consumer.partner.breaker import BreakerPolicy, BreakerState, CircuitBreaker
from consumer.partner.ratelimit import RateLimit, TokenBucket

LANES = (Lane.LIVE, Lane.BACKFILL)


@dataclass(eq=False, slots=True)
class Job:
    """One submitted call, from its submission until its future is done."""

    seq: int
    agency: str
    lane: Lane
    call: Callable[[], Awaitable[Any]]
    future: asyncio.Future[Any]
    submitted_at: float
    failures: int = 0  # retriable failures in the current round
    queued: bool = True  # counted in its agency's queued count (waiting, not running)
    gated: bool = True  # waits while its agency is paused (lookups that send nothing do not)


@dataclass(eq=False, slots=True)
class AgencyQueues:
    """One agency's token bucket and breaker, its ready jobs per lane and its counts."""

    bucket: TokenBucket
    breaker: CircuitBreaker
    ready: dict[Lane, deque[Job]] = field(default_factory=lambda: {lane: deque() for lane in LANES})
    queued: dict[Lane, int] = field(default_factory=lambda: dict.fromkeys(LANES, 0))
    running: int = 0


@dataclass(frozen=True, slots=True)
class SchedulerSnapshot:
    """Backlog and health for metrics and the status page."""

    queued: dict[Lane, dict[str, int]]  # waiting jobs (not running) by lane, then agency
    running: dict[str, int]  # attempts in flight by agency
    oldest_pending_seconds: dict[Lane, float | None]  # age of the oldest unfinished job
    breakers: dict[str, BreakerState]  # every agency seen so far
    paused: frozenset[str] = frozenset()  # agencies an operator paused: nothing of theirs starts


class LaneQueues:
    """The queued jobs of every agency, per lane, and the round-robin between agencies."""

    def __init__(
        self,
        *,
        concurrency: int,
        default_rate_limit: RateLimit | None,
        rate_limits: Mapping[str, RateLimit] | None,
        breaker: BreakerPolicy | None,
        observer: SchedulerObserver,
        clock: Callable[[], float],
    ) -> None:
        # Backfill may use every worker but one, so a live document never waits behind it.
        self._backfill_slots = max(1, concurrency - 1)
        self._backfill_running = 0
        self._default_limit = default_rate_limit or RateLimit()
        self._limits = dict(rate_limits or {})
        self._breaker_policy = breaker or BreakerPolicy()
        self._observer = observer
        self._clock = clock
        self._agencies: dict[str, AgencyQueues] = {}
        # Agencies with ready jobs, per lane, in round-robin order (dicts keep insertion order).
        self._rotation: dict[Lane, dict[str, None]] = {lane: {} for lane in LANES}
        self._delayed: list[tuple[float, int, Job]] = []  # heap of jobs backing off
        self._pending: dict[Lane, dict[int, Job]] = {lane: {} for lane in LANES}
        self._waiters: set[asyncio.Future[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._paused: frozenset[str] = frozenset()
        self._rate_share = 1.0

    def snapshot(self) -> SchedulerSnapshot:
        """Queued counts, jobs in flight, oldest pending age per lane and breaker states."""
        now = self._clock()
        oldest: dict[Lane, float | None] = {}
        for lane in LANES:
            first = next(iter(self._pending[lane].values()), None)
            oldest[lane] = None if first is None else max(0.0, now - first.submitted_at)
        return SchedulerSnapshot(
            queued={
                lane: {name: a.queued[lane] for name, a in self._agencies.items() if a.queued[lane]}
                for lane in LANES
            },
            running={name: a.running for name, a in self._agencies.items() if a.running},
            oldest_pending_seconds=oldest,
            breakers={name: a.breaker.state(now) for name, a in self._agencies.items()},
            paused=self._paused,
        )

    async def _next_job(self) -> Job:
        loop = asyncio.get_running_loop()
        while True:
            job, wake_at = self._pick(self._clock())
            if job is not None:
                return job
            # Registered before awaiting, so a submit between now and the wait still wakes us.
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.add(waiter)
            timeout = None if wake_at is None else max(0.0, wake_at - self._clock())
            try:
                await asyncio.wait({waiter}, timeout=timeout)
            finally:
                self._waiters.discard(waiter)
                waiter.cancel()

    def _pick(self, now: float) -> tuple[Job | None, float | None]:
        """The next job to send now, or the time when one may become sendable (None: unknown)."""
        while self._delayed and self._delayed[0][0] <= now:
            _, _, job = heapq.heappop(self._delayed)
            self._make_ready(job, self._agencies[job.agency], first=True)
        wake_at = self._delayed[0][0] if self._delayed else None
        for lane in LANES:
            if lane is Lane.BACKFILL and self._backfill_running >= self._backfill_slots:
                break  # the last worker stays free for live work, however long the backfill
            rotation = self._rotation[lane]
            for name in list(rotation):
                agency = self._agencies[name]
                queue = agency.ready[lane]
                while queue and queue[0].future.done():
                    queue.popleft()  # withdrawn by its caller; the done callback forgets it
                if not queue:
                    del rotation[name]
                    continue
                index: int | None = 0
                if name in self._paused:
                    index = _first_ungated(queue)
                if index is None:
                    continue  # only paused work: resuming wakes the workers
                if not agency.breaker.allows(now):
                    wake_at = _earliest(wake_at, agency.breaker.reopens_at(now))
                    continue
                if not agency.bucket.try_take(now):
                    wake_at = _earliest(wake_at, agency.bucket.available_at(now))
                    continue
                job = queue[index]
                del queue[index]
                del rotation[name]
                if queue:
                    rotation[name] = None  # to the back of the round
                return job, None
        return None, wake_at

    @property
    def rate_share(self) -> float:
        """The part of every agency's rate this scheduler sends at (see ``set_rate_share``)."""
        return self._rate_share

    def set_rate_share(self, fraction: float) -> None:
        """Send at ``fraction`` of each agency's configured rate and burst from now on.

        An agency's rate is what ChouetteCopro allows its API key, whichever replica sends; each
        replica takes the part of it that its share of the input partitions gives it.
        """
        if fraction == self._rate_share:
            return
        self._rate_share = fraction
        now = self._clock()
        for name, agency in self._agencies.items():
            agency.bucket.retune(self._limit(name), now=now)

    def _limit(self, name: str) -> RateLimit:
        return self._limits.get(name, self._default_limit).scaled(self._rate_share)

    def _agency(self, name: str) -> AgencyQueues:
        agency = self._agencies.get(name)
        if agency is None:
            agency = AgencyQueues(
                bucket=TokenBucket(self._limit(name), now=self._clock()),
                breaker=CircuitBreaker(
                    self._breaker_policy,
                    on_change=lambda state: self._observer.breaker_changed(name, state),
                ),
            )
            self._agencies[name] = agency
        return agency

    def _make_ready(self, job: Job, agency: AgencyQueues, *, first: bool) -> None:
        queue = agency.ready[job.lane]
        if first:
            queue.appendleft(job)  # a retried job is older than anything behind it
        else:
            queue.append(job)
        self._rotation[job.lane].setdefault(job.agency, None)

    def _requeue(self, job: Job, agency: AgencyQueues) -> None:
        job.queued = True
        agency.queued[job.lane] += 1

    def _unqueue(self, job: Job) -> None:
        if job.queued:
            job.queued = False
            self._agencies[job.agency].queued[job.lane] -= 1

    def _forget(self, job: Job) -> None:
        """The job's future is done: it no longer counts, wherever it still sits."""
        self._unqueue(job)
        pending = self._pending[job.lane]
        pending.pop(job.seq, None)
        if not any(self._pending.values()):
            self._idle.set()

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()


def _first_ungated(queue: deque[Job]) -> int | None:
    """Where the first job that may go while its agency is paused waits, if one does."""
    return next((i for i, job in enumerate(queue) if not job.gated and not job.future.done()), None)


def _earliest(current: float | None, candidate: float | None) -> float | None:
    if candidate is None:
        return current
    return candidate if current is None else min(current, candidate)
