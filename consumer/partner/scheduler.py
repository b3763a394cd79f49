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
caller orders operations that depend on each other. The queues and their fairness are
``lanes``'s, the retry policy and the outcomes ``attempts``'s; this module runs the attempts.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Self, TypeVar

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
from consumer.partner.breaker import BreakerPolicy, BreakerState
from consumer.partner.lanes import LANES, AgencyQueues, Job, LaneQueues, SchedulerSnapshot
from consumer.partner.ratelimit import RateLimit

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


class Scheduler(LaneQueues):
    """Runs submitted jobs on ``concurrency`` workers; an async context manager."""

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
        super().__init__(
            concurrency=concurrency,
            default_rate_limit=default_rate_limit,
            rate_limits=rate_limits,
            breaker=breaker,
            observer=observer or NoObserver(),
            clock=clock,
        )
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

        ``gated=False`` is for a job that sends nothing (a lookup): it goes even while its agency
        is paused, still within the agency's rate and breaker.
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

    def set_paused(self, agencies: frozenset[str]) -> None:
        """The agencies an operator paused: their jobs stay queued and none of them starts
        (attempts already running finish) until the agency is no longer in the set."""
        self._paused = frozenset(agencies)
        self._wake()

    @property
    def paused(self) -> frozenset[str]:
        return self._paused

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
