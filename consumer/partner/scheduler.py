"""Runs partner operations: two lanes, per-agency rate limits and breakers, bounded retries.

A job is an async callable submitted for an agency in a lane; ``submit`` returns a future that
completes with the job's result, or with its error once the error is final (not retriable, needs
an operator, or not the partner's doing: ``consumer.failures`` decides). Retriable partner
failures are retried with jittered backoff or after the partner's Retry-After (and a request
whose outcome is in doubt not before the partner is surely done with it); a job that runs
out of attempts, or fails as a half-open breaker's probe, goes to the back of its agency's queue
behind the breaker: work is never dropped, and one job the partner always fails is not every probe.
Workers take live work before backfill and rotate between agencies, so one agency's backfill
never holds back another agency. Jobs of one agency may run concurrently and in any order: the
caller orders operations that depend on each other. The retry policy and the outcomes are
``attempts``'s; the queues, their fairness and the attempts are this module's, one class.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar

from consumer.core.planning.plan import Lane  # the lanes are the planner's: live before backfill
from consumer.errors import ConfigError
from consumer.failures import Disposition, Verdict, classify
from consumer.partner.attempts import (
    NoObserver,
    Outcome,
    RetryPolicy,
    RetryReason,
    SchedulerObserver,
)
from consumer.partner.breaker import BreakerPolicy, BreakerState, CircuitBreaker
from consumer.partner.ratelimit import RateLimit, TokenBucket

__all__ = [
    "BreakerPolicy",
    "BreakerState",
    "Lane",
    "Outcome",
    "RateLimit",
    "RetryPolicy",
    "RetryReason",
    "Scheduler",
    "SchedulerObserver",
    "SchedulerSnapshot",
]

T = TypeVar("T")
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
    gated: bool = True  # waits while its agency is paused (live lookups that send nothing do not)


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
    backfill_paused: frozenset[str] = frozenset()  # only their backfill lane waits


class Scheduler:
    """Runs submitted jobs on ``concurrency`` workers; an async context manager.

    It keeps the queued jobs of every agency per lane and rotates between agencies (live before
    backfill, which may use every worker but one; a job goes only when its agency's breaker
    allows it, its token bucket has a token, and no operator paused its agency unless it is a
    live-lane job that sends nothing), and runs the attempts.
    """

    def __init__(
        self,
        *,
        concurrency: int,
        default_rate_limit: RateLimit | None = None,
        rate_limits: Mapping[str, RateLimit] | None = None,
        retry: RetryPolicy | None = None,
        breaker: BreakerPolicy | None = None,
        observer: SchedulerObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
        # Backfill may use every worker but one, so a live document never waits behind it.
        self._backfill_slots = max(1, concurrency - 1)
        self._backfill_running = 0
        self._default_limit = default_rate_limit or RateLimit()
        self._limits = dict(rate_limits or {})
        self._breaker_policy = breaker or BreakerPolicy()
        self._observer = observer or NoObserver()
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
        self._backfill_paused: frozenset[str] = frozenset()
        self._rate_share = 1.0

        self._concurrency = concurrency
        self._retry = retry or RetryPolicy()
        self._rng = rng or random.Random()  # noqa: S311 - backoff jitter, not cryptography
        self._seq = itertools.count()
        self._runner: asyncio.Task[None] | None = None
        self._closed = False

    async def __aenter__(self) -> Self:
        if self._runner is not None or self._closed:
            raise RuntimeError("a scheduler is started once")
        self._runner = asyncio.create_task(self.run(), name="scheduler")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def run(self) -> None:
        """Run the workers until cancelled.

        ``async with`` runs this in a task of its own; a composition root that owns a TaskGroup
        may run it there instead, so that a crashing worker stops the service, and still call
        ``close()`` to cancel what is left.
        """
        async with asyncio.TaskGroup() as workers:
            for number in range(self._concurrency):
                workers.create_task(self._work(), name=f"scheduler-worker-{number}")

    def submit(
        self,
        call: Callable[[], Awaitable[T]],
        *,
        agency_id: str,
        lane: Lane,
        gated: bool = True,
    ) -> asyncio.Future[T]:
        """Queue a job; cancelling the returned future before the job starts withdraws it.

        ``gated=False`` is for a job that sends nothing (a lookup): in the live lane it goes even
        while its agency is paused, still within the agency's rate and breaker. Nothing of the
        backfill lane goes while a pause covers it (either pause), lookups included.
        """
        if self._closed:
            raise RuntimeError("the scheduler is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        job = Job(next(self._seq), agency_id, lane, call, future, self._clock(), gated=gated)
        agency = self._agency(agency_id)
        agency.queued[lane] += 1
        self._pending[lane][job.seq] = job
        self._idle.clear()
        self._make_ready(job, agency, first=False)
        future.add_done_callback(lambda _: self._forget(job))
        self._wake()
        return future

    async def take_token(self, agency_id: str) -> None:
        """Wait for one more of the agency's tokens, for a job that needs a second request.

        A job's attempt takes one token when it starts; a job that sends another request in the
        same attempt (a lookup before uploading again) takes one more here, so that every request
        counts against the agency's rate and respects its Retry-After pause.
        """
        agency = self._agency(agency_id)
        while True:
            now = self._clock()
            if agency.bucket.try_take(now):
                return
            await asyncio.sleep(max(agency.bucket.available_at(now) - now, 0.001))

    def set_paused(
        self, agencies: frozenset[str], *, backfill_only: frozenset[str] = frozenset()
    ) -> None:
        """The agencies an operator paused: their jobs stay queued and none of them starts
        (attempts already running finish; live lookups go) until the agency is no longer in the
        set. For the agencies in ``backfill_only`` only the backfill lane waits, whole."""
        self._paused = frozenset(agencies)
        self._backfill_paused = frozenset(backfill_only)
        self._wake()

    @property
    def paused(self) -> frozenset[str]:
        return self._paused

    @property
    def backfill_paused(self) -> frozenset[str]:
        return self._backfill_paused

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109 - says if it drained
        """Wait until every submitted job is finished; False if ``timeout`` seconds pass first."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop the workers and cancel the futures of unfinished jobs. Closing twice is harmless."""
        self._closed = True
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            await asyncio.wait({runner})
        for lane in LANES:
            for job in list(self._pending[lane].values()):
                job.future.cancel()
        if runner is not None and not runner.cancelled() and runner.exception() is not None:
            raise RuntimeError("a scheduler worker crashed") from runner.exception()

    # -- workers -----------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            job = await self._next_job()
            await self._attempt(job)
            self._wake()

    async def _attempt(self, job: Job) -> None:
        agency = self._agencies[job.agency]
        now = self._clock()
        probe = agency.breaker.start(now)
        self._unqueue(job)
        agency.running += 1
        backfill = job.lane is Lane.BACKFILL
        self._backfill_running += backfill
        self._observer.job_started(job.agency, job.lane)
        try:
            outcome = await self._settle(job, agency, probe=probe)
        finally:
            agency.running -= 1
            self._backfill_running -= backfill
        self._observer.job_finished(job.agency, job.lane, outcome, self._clock() - now)

    async def _settle(self, job: Job, agency: AgencyQueues, *, probe: bool) -> Outcome:
        """Run one attempt and settle the job's future, or reschedule the job."""
        try:
            result = await job.call()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the scheduler is closing; close() cancels the futures
            agency.breaker.release_probe(probe=probe)
            job.future.cancel()
            return Outcome.CANCELLED
        except Exception as error:  # noqa: BLE001 - every error is the job's result, for its caller
            return self._failed(job, agency, error, probe=probe)
        agency.breaker.record_success(probe=probe)
        if not job.future.done():
            job.future.set_result(result)
        return Outcome.SUCCEEDED

    def _failed(self, job: Job, agency: AgencyQueues, error: Exception, *, probe: bool) -> Outcome:
        """Settle or reschedule a job whose attempt raised ``error``."""
        now = self._clock()
        verdict = classify(error)
        if not verdict.from_partner or verdict.disposition is not Disposition.RETRY:
            return self._final(job, agency, error, verdict, probe=probe)
        retry_after: float | None = getattr(error, "retry_after", None)
        # "Too many requests, come back then" is a rate signal, not a health one: it pauses the
        # agency but neither counts for its breaker nor uses up the job's round of attempts. A
        # 5xx with Retry-After pauses the agency and counts as a failure.
        rate_limited = retry_after is not None and getattr(error, "status", None) in (None, 429)
        if retry_after is not None:
            agency.bucket.pause_until(now + max(0.0, retry_after), now=now)
        if rate_limited:
            agency.breaker.release_probe(probe=probe)
        else:
            agency.breaker.record_failure(now, probe=probe)
        if job.future.done():
            return Outcome.CANCELLED
        if not rate_limited:
            job.failures += 1
        self._requeue(job, agency)
        # Sent, and no answer says what became of it: not again before the partner is surely
        # done with it, or the next attempt's lookup may miss what is still on its way.
        settled = now + self._retry.in_doubt_seconds if getattr(error, "in_doubt", False) else now
        if job.failures >= self._retry.max_attempts:
            job.failures = 0
            agency.breaker.trip(now)
            self._behind(job, agency, RetryReason.ROUND_EXHAUSTED, not_before=settled)
            return Outcome.REQUEUED
        if probe and not rate_limited:
            # The breaker's longer cool-down is this job's backoff.
            self._behind(job, agency, RetryReason.BACKOFF, not_before=settled)
            return Outcome.REQUEUED
        if retry_after is not None:
            not_before, reason = now + max(0.0, retry_after), RetryReason.RETRY_AFTER
        else:
            not_before = now + self._retry.delay(job.failures, self._rng)
            reason = RetryReason.BACKOFF
        heapq.heappush(self._delayed, (max(not_before, settled), job.seq, job))
        self._observer.retry(job.agency, reason)
        return Outcome.RETRYING

    def _final(
        self, job: Job, agency: AgencyQueues, error: Exception, verdict: Verdict, *, probe: bool
    ) -> Outcome:
        """Complete the job's future with ``error``, which no retry here can mend."""
        if not job.future.done():
            job.future.set_exception(error)
        if not verdict.from_partner:
            # Not the partner's doing (the document store, a bug in the job): the breaker learns
            # nothing, a probe lets another job go, and the caller decides what comes next, so a
            # document whose content cannot be had never holds its agency back.
            agency.breaker.release_probe(probe=probe)
            return Outcome.FAILED
        # The partner answered: the account itself is reachable.
        agency.breaker.record_success(probe=probe)
        return Outcome.PARKED if verdict.disposition is Disposition.PARK else Outcome.FAILED

    def _behind(
        self, job: Job, agency: AgencyQueues, reason: RetryReason, *, not_before: float
    ) -> None:
        """Back in the queue behind the agency's other work: the next probe is another job, so
        one document the partner always fails on is never all its agency ever asks again. A job
        whose outcome is in doubt waits until ``not_before`` first."""
        if not_before > self._clock():
            heapq.heappush(self._delayed, (not_before, job.seq, job))
        else:
            self._make_ready(job, agency, first=False)
        self._observer.retry(job.agency, reason)

    # -- queues and fairness ----------------------------------------------------------------
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
            backfill_paused=self._backfill_paused,
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
                if lane is Lane.BACKFILL and (
                    name in self._paused or name in self._backfill_paused
                ):
                    # Nothing of a paused backfill reaches the partner, not even a lookup: the
                    # lookups that go while an agency is paused (a restart's reconcile, a
                    # repair's, an audit's) are live-lane jobs.
                    index = None
                elif name in self._paused:
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
