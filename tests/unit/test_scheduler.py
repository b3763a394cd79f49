"""The scheduler: lanes, fairness between agencies, rate limits, retries, breakers, lifecycle.

These tests run the real scheduler on the event loop with short durations; they wait for
outcomes by awaiting futures or by polling with a deadline, never by sleeping a guessed time.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.errors import PartnerParkedError, PartnerRejectedError, PartnerRetriableError
from consumer.partner.scheduler import (
    BreakerPolicy,
    BreakerState,
    Lane,
    Outcome,
    RateLimit,
    RetryPolicy,
    RetryReason,
    Scheduler,
)

DEADLINE_SECONDS = 5.0  # only reached when a test fails
FAST_RETRY = RetryPolicy(max_attempts=3, base_seconds=0.005, cap_seconds=0.02)
FAST_BREAKER = BreakerPolicy(failure_threshold=3, cooldown_seconds=0.05, max_cooldown_seconds=0.2)


@dataclass
class RecordingObserver:
    """Keeps every observer call, in order."""

    started: list[tuple[str, Lane]] = field(default_factory=list)
    finished: list[tuple[str, Lane, Outcome]] = field(default_factory=list)
    retries: list[tuple[str, RetryReason]] = field(default_factory=list)
    breakers: list[tuple[str, BreakerState]] = field(default_factory=list)

    def job_started(self, agency: str, lane: Lane) -> None:
        self.started.append((agency, lane))

    def job_finished(self, agency: str, lane: Lane, outcome: Outcome, seconds: float) -> None:
        assert seconds >= 0
        self.finished.append((agency, lane, outcome))

    def retry(self, agency: str, reason: RetryReason) -> None:
        self.retries.append((agency, reason))

    def breaker_changed(self, agency: str, state: BreakerState) -> None:
        self.breakers.append((agency, state))


class Job:
    """A partner call that raises the given errors in turn, then returns its name."""

    def __init__(self, name: str, errors: Iterator[BaseException] | None = None) -> None:
        self.name = name
        self.errors = errors if errors is not None else iter(())
        self.attempts: list[float] = []  # monotonic time of each attempt
        self.failed_at: list[float] = []

    async def __call__(self) -> str:
        self.attempts.append(time.monotonic())
        await asyncio.sleep(0)
        error = next(self.errors, None)
        if error is not None:
            self.failed_at.append(time.monotonic())
            raise error
        return self.name


def failing(
    times: int, error: Callable[[], BaseException] | None = None
) -> Iterator[BaseException]:
    make = error or (lambda: PartnerRetriableError("503", status=503))
    return (make() for _ in range(times))


def forever(error: Callable[[], BaseException] | None = None) -> Iterator[BaseException]:
    make = error or (lambda: PartnerRetriableError("503", status=503))
    while True:
        yield make()


async def eventually(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` until it holds, failing the test after a generous deadline."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.002)


MakeScheduler = Callable[..., Scheduler]


@pytest.fixture
def observer() -> RecordingObserver:
    return RecordingObserver()


@pytest.fixture
def make_scheduler(observer: RecordingObserver) -> MakeScheduler:
    def make(**overrides: Any) -> Scheduler:
        options: dict[str, Any] = {
            "concurrency": 2,
            "retry": FAST_RETRY,
            "breaker": FAST_BREAKER,
            "observer": observer,
            "rng": random.Random(7),  # noqa: S311 - jitter, seeded for repeatable tests
        }
        options.update(overrides)
        return Scheduler(**options)

    return make


async def all_done(futures: list[asyncio.Future[str]]) -> list[str]:
    """The results of ``futures``, failing the test after a generous deadline."""
    async with asyncio.timeout(DEADLINE_SECONDS):
        return list(await asyncio.gather(*futures))


# -- priorities and fairness -----------------------------------------------------------------


async def test_live_jobs_go_before_backfill(make_scheduler: MakeScheduler) -> None:
    order: list[str] = []

    def job(name: str) -> Callable[[], Awaitable[str]]:
        async def call() -> str:
            order.append(name)
            return name

        return call

    scheduler = make_scheduler(concurrency=1)
    futures = [
        scheduler.submit(job(f"backfill-{i}"), agency_id="a", lane=Lane.BACKFILL) for i in range(5)
    ]
    futures += [scheduler.submit(job(f"live-{i}"), agency_id="b", lane=Lane.LIVE) for i in range(5)]
    async with scheduler:
        await all_done(futures)

    assert [name.split("-")[0] for name in order] == ["live"] * 5 + ["backfill"] * 5


async def test_one_agencys_backfill_does_not_starve_another(make_scheduler: MakeScheduler) -> None:
    finished: list[str] = []

    def job(agency: str) -> Callable[[], Awaitable[str]]:
        async def call() -> str:
            await asyncio.sleep(0)
            finished.append(agency)
            return agency

        return call

    scheduler = make_scheduler(concurrency=2)
    futures = [scheduler.submit(job("a"), agency_id="a", lane=Lane.BACKFILL) for _ in range(1000)]
    futures += [scheduler.submit(job("b"), agency_id="b", lane=Lane.BACKFILL) for _ in range(10)]
    async with scheduler:
        await all_done(futures)

    last_b = max(index for index, agency in enumerate(finished) if agency == "b")
    assert last_b < 30, f"b's last job finished at position {last_b} of {len(finished)}"


async def test_a_throttled_agency_does_not_hold_back_the_others(
    make_scheduler: MakeScheduler,
) -> None:
    slow, fast = Job("slow"), [Job(f"fast-{i}") for i in range(20)]
    scheduler = make_scheduler(
        concurrency=1, rate_limits={"slow": RateLimit(rate_per_second=2, burst=1)}
    )
    async with scheduler:
        slow_futures = [scheduler.submit(slow, agency_id="slow", lane=Lane.LIVE) for _ in range(3)]
        await all_done([scheduler.submit(j, agency_id="fast", lane=Lane.LIVE) for j in fast])
        assert len(slow.attempts) == 1  # its next token is 0.5 s away
        await all_done(slow_futures)


# -- rate limits -----------------------------------------------------------------------------


async def test_an_agencys_rate_is_never_exceeded(make_scheduler: MakeScheduler) -> None:
    rate, burst = 50.0, 5
    sent: list[float] = []

    async def call() -> str:
        sent.append(time.monotonic())
        await asyncio.sleep(0.001)
        return "ok"

    scheduler = make_scheduler(
        concurrency=4, default_rate_limit=RateLimit(rate_per_second=rate, burst=burst)
    )
    async with scheduler:
        await all_done([scheduler.submit(call, agency_id="a", lane=Lane.LIVE) for _ in range(60)])

    for window in (0.1, 0.25, 0.5, 1.0):
        most = max(
            sum(1 for later in sent[index:] if later - start < window)
            for index, start in enumerate(sent)
        )
        assert most <= rate * window + burst, (window, most)
    assert sent[-1] - sent[0] == pytest.approx((60 - burst) / rate, abs=0.25)


async def test_a_replica_sends_at_its_share_of_the_agency_rate(
    make_scheduler: MakeScheduler,
) -> None:
    sent: list[float] = []

    async def call() -> str:
        sent.append(time.monotonic())
        return "ok"

    scheduler = make_scheduler(
        concurrency=4, default_rate_limit=RateLimit(rate_per_second=40.0, burst=4)
    )
    async with scheduler:
        await all_done([scheduler.submit(call, agency_id="a", lane=Lane.LIVE) for _ in range(4)])
        scheduler.set_rate_share(0.25)  # one partition of four: 10 a second, burst 1
        sent.clear()
        await all_done([scheduler.submit(call, agency_id="a", lane=Lane.LIVE) for _ in range(11)])

    assert scheduler.rate_share == 0.25
    # 40 a second would send these in a quarter of a second; a share of 10 takes one at least.
    assert sent[-1] - sent[0] >= 0.95


async def test_a_job_that_sends_a_second_request_takes_a_second_token(
    make_scheduler: MakeScheduler,
) -> None:
    rate, burst = 50.0, 2
    sent: list[float] = []
    scheduler = make_scheduler(
        concurrency=4, default_rate_limit=RateLimit(rate_per_second=rate, burst=burst)
    )

    async def lookup_then_upload() -> str:
        sent.append(time.monotonic())  # the lookup: the attempt's own token
        await scheduler.take_token("a")
        sent.append(time.monotonic())  # the upload after it
        return "ok"

    async with scheduler:
        await all_done(
            [scheduler.submit(lookup_then_upload, agency_id="a", lane=Lane.LIVE) for _ in range(20)]
        )

    sent.sort()
    assert len(sent) == 40
    for window in (0.1, 0.25, 0.5):
        most = max(
            sum(1 for later in sent[index:] if later - start < window)
            for index, start in enumerate(sent)
        )
        assert most <= rate * window + burst, (window, most)


async def test_a_long_backfill_never_takes_the_last_worker_from_live_work(
    make_scheduler: MakeScheduler,
) -> None:
    release = asyncio.Event()
    started: list[str] = []

    async def slow_backfill() -> str:
        started.append("backfill")
        await release.wait()
        return "backfill"

    live_started = asyncio.Event()

    async def live() -> str:
        live_started.set()
        return "live"

    async with make_scheduler(concurrency=3) as scheduler:
        backfill = [
            scheduler.submit(slow_backfill, agency_id="a", lane=Lane.BACKFILL) for _ in range(10)
        ]
        await eventually(lambda: len(started) == 2)
        first = scheduler.submit(live, agency_id="b", lane=Lane.LIVE)
        # Two workers hold backfill uploads that do not end; the third takes the live job.
        await asyncio.wait_for(live_started.wait(), DEADLINE_SECONDS)
        assert await first == "live"
        assert len(started) == 2
        release.set()
        await all_done(backfill)


# -- retries ---------------------------------------------------------------------------------


async def test_retry_after_is_honoured_for_the_whole_agency(make_scheduler: MakeScheduler) -> None:
    limited = Job("limited", failing(1, lambda: PartnerRetriableError("429", retry_after=0.2)))
    same_key, other = Job("same-key"), Job("other")
    async with make_scheduler(concurrency=2) as scheduler:
        first = scheduler.submit(limited, agency_id="a", lane=Lane.LIVE)
        await eventually(lambda: bool(limited.failed_at))
        later = scheduler.submit(same_key, agency_id="a", lane=Lane.LIVE)
        assert await all_done([scheduler.submit(other, agency_id="b", lane=Lane.LIVE)]) == ["other"]
        assert not same_key.attempts
        await all_done([first, later])

    paused_until = limited.failed_at[0] + 0.2
    assert limited.attempts[1] >= paused_until
    assert same_key.attempts[0] >= paused_until
    assert other.attempts[0] < paused_until


async def test_backoff_between_attempts_is_bounded_and_grows(
    make_scheduler: MakeScheduler, observer: RecordingObserver
) -> None:
    policy = RetryPolicy(max_attempts=4, base_seconds=0.02, cap_seconds=0.05)
    job = Job("flaky", failing(3))
    async with make_scheduler(retry=policy) as scheduler:
        assert await all_done([scheduler.submit(job, agency_id="a", lane=Lane.LIVE)]) == ["flaky"]

    gaps = [start - failed for failed, start in zip(job.failed_at, job.attempts[1:], strict=True)]
    for failures, gap in enumerate(gaps, start=1):
        ceiling = min(0.05, 0.02 * 2 ** (failures - 1))
        assert ceiling / 2 <= gap <= ceiling + 0.05, (failures, gap)
    assert observer.retries == [("a", RetryReason.BACKOFF)] * 3


async def test_a_request_in_doubt_is_not_tried_again_before_the_partner_is_surely_done(
    make_scheduler: MakeScheduler,
) -> None:
    # Sent and never answered: the partner may still carry it out, so the next attempt (whose
    # lookup must see it) waits ``in_doubt_seconds``; a plain 503 only waits its backoff, and
    # the agency's other jobs go meanwhile.
    policy = RetryPolicy(
        max_attempts=5, base_seconds=0.001, cap_seconds=0.001, in_doubt_seconds=0.3
    )
    lost = Job("lost", failing(1, lambda: PartnerRetriableError("timed out", in_doubt=True)))
    refused, other = Job("refused", failing(1)), Job("other")
    async with make_scheduler(retry=policy, concurrency=1) as scheduler:
        futures = [scheduler.submit(j, agency_id="a", lane=Lane.LIVE) for j in (lost, refused)]
        await eventually(lambda: bool(lost.failed_at))
        futures.append(scheduler.submit(other, agency_id="a", lane=Lane.LIVE))
        assert await all_done(futures) == ["lost", "refused", "other"]

    assert lost.attempts[1] - lost.failed_at[0] >= 0.3
    assert refused.attempts[1] - refused.failed_at[0] < 0.3
    assert other.attempts[0] < lost.attempts[1]


async def test_a_request_in_doubt_that_ends_a_round_still_waits_before_the_next(
    make_scheduler: MakeScheduler,
) -> None:
    policy = RetryPolicy(
        max_attempts=1, base_seconds=0.001, cap_seconds=0.001, in_doubt_seconds=0.3
    )
    breaker = BreakerPolicy(failure_threshold=100, cooldown_seconds=0.01, max_cooldown_seconds=0.01)
    lost = Job("lost", failing(1, lambda: PartnerRetriableError("502", status=502, in_doubt=True)))
    async with make_scheduler(retry=policy, breaker=breaker) as scheduler:
        assert await all_done([scheduler.submit(lost, agency_id="a", lane=Lane.LIVE)]) == ["lost"]

    assert lost.attempts[1] - lost.failed_at[0] >= 0.3


def test_backoff_delays_are_jittered_within_their_bounds() -> None:
    policy = RetryPolicy(max_attempts=10, base_seconds=1.0, cap_seconds=8.0)
    rng = random.Random(1)  # noqa: S311 - jitter, seeded for repeatable tests

    for failures, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0), (500, 8.0)]:
        delays = [policy.delay(failures, rng) for _ in range(50)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
        assert len(set(delays)) == 50


async def test_operator_errors_are_not_retried(
    make_scheduler: MakeScheduler, observer: RecordingObserver
) -> None:
    job = Job("parked", forever(lambda: PartnerParkedError("401", status=401)))
    async with make_scheduler() as scheduler:
        future = scheduler.submit(job, agency_id="a", lane=Lane.LIVE)
        with pytest.raises(PartnerParkedError):
            await future

    assert len(job.attempts) == 1
    assert observer.finished == [("a", Lane.LIVE, Outcome.PARKED)]


@pytest.mark.parametrize(
    "error", [PartnerRejectedError("422", status=422), KeyError("bug in the job")]
)
async def test_final_errors_complete_the_future_with_the_error(
    make_scheduler: MakeScheduler, error: Exception
) -> None:
    job = Job("rejected", forever(lambda: error))
    async with make_scheduler() as scheduler:
        future = scheduler.submit(job, agency_id="a", lane=Lane.BACKFILL)
        with pytest.raises(type(error)):
            await future

    assert len(job.attempts) == 1


async def test_nothing_is_lost_across_a_long_failure(
    make_scheduler: MakeScheduler, observer: RecordingObserver
) -> None:
    job = Job("stubborn", failing(20))
    breaker = BreakerPolicy(failure_threshold=10, cooldown_seconds=0.01, max_cooldown_seconds=0.02)
    async with make_scheduler(breaker=breaker) as scheduler:
        result = await all_done([scheduler.submit(job, agency_id="a", lane=Lane.LIVE)])

    assert result == ["stubborn"]
    assert len(job.attempts) == 21
    reasons = Counter(reason for _, reason in observer.retries)
    assert reasons[RetryReason.ROUND_EXHAUSTED] == 20 // FAST_RETRY.max_attempts
    assert reasons[RetryReason.BACKOFF] + reasons[RetryReason.ROUND_EXHAUSTED] == 20


# -- circuit breaker -------------------------------------------------------------------------


async def test_a_broken_agency_waits_while_others_proceed(
    make_scheduler: MakeScheduler, observer: RecordingObserver
) -> None:
    broken = Job("broken", forever())
    healthy = [Job(f"healthy-{i}") for i in range(10)]
    breaker = BreakerPolicy(failure_threshold=2, cooldown_seconds=30.0, max_cooldown_seconds=60.0)
    retry = RetryPolicy(max_attempts=100, base_seconds=0.001, cap_seconds=0.002)
    async with make_scheduler(breaker=breaker, retry=retry) as scheduler:
        parked = [scheduler.submit(broken, agency_id="a", lane=Lane.LIVE) for _ in range(2)]
        await eventually(lambda: ("a", BreakerState.OPEN) in observer.breakers)
        done = await all_done([scheduler.submit(j, agency_id="b", lane=Lane.LIVE) for j in healthy])

        assert done == [f"healthy-{i}" for i in range(10)]
        assert len(broken.attempts) == 2
        snapshot = scheduler.snapshot()
        assert snapshot.breakers == {"a": BreakerState.OPEN, "b": BreakerState.CLOSED}
        assert snapshot.queued == {Lane.LIVE: {"a": 2}, Lane.BACKFILL: {}}

    assert all(future.cancelled() for future in parked)


async def test_half_open_sends_one_probe_and_a_failed_probe_waits_longer(
    make_scheduler: MakeScheduler, observer: RecordingObserver
) -> None:
    job = Job("shared", failing(4))
    breaker = BreakerPolicy(failure_threshold=3, cooldown_seconds=0.05, max_cooldown_seconds=1.0)
    retry = RetryPolicy(max_attempts=100, base_seconds=0.001, cap_seconds=0.001)
    async with make_scheduler(concurrency=4, breaker=breaker, retry=retry) as scheduler:
        futures = [scheduler.submit(job, agency_id="a", lane=Lane.LIVE) for _ in range(3)]
        assert await all_done(futures) == ["shared"] * 3

    # Three concurrent failures open the breaker; the first probe fails (reopened for 0.1 s);
    # the second probe succeeds and closes it; then the other two jobs go.
    opened, probe, second_probe = job.failed_at[2], job.attempts[3], job.attempts[4]
    assert probe - opened >= 0.05
    assert second_probe - job.failed_at[3] >= 0.1
    assert [state for _, state in observer.breakers] == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


async def test_one_job_the_partner_always_fails_is_not_every_probe_of_its_agency(
    make_scheduler: MakeScheduler, observer: RecordingObserver
) -> None:
    poison = Job("poison", forever())  # say, a PDF the partner chokes on
    healthy = [Job(f"healthy-{i}") for i in range(3)]
    breaker = BreakerPolicy(failure_threshold=100, cooldown_seconds=0.02, max_cooldown_seconds=0.1)
    async with make_scheduler(concurrency=1, breaker=breaker) as scheduler:
        stuck = scheduler.submit(poison, agency_id="a", lane=Lane.LIVE)
        await eventually(lambda: ("a", BreakerState.OPEN) in observer.breakers)
        done = await all_done([scheduler.submit(j, agency_id="a", lane=Lane.LIVE) for j in healthy])

        assert done == [f"healthy-{i}" for i in range(3)]
        assert not stuck.done()  # still tried, never dropped
    assert len(poison.attempts) >= FAST_RETRY.max_attempts + 1


# -- lifecycle and status --------------------------------------------------------------------


async def test_close_cancels_queued_and_running_jobs_and_can_be_repeated(
    make_scheduler: MakeScheduler,
) -> None:
    started = asyncio.Event()

    async def hang() -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    scheduler = make_scheduler(concurrency=1)
    async with scheduler:
        running = scheduler.submit(hang, agency_id="a", lane=Lane.LIVE)
        queued = [scheduler.submit(Job("q"), agency_id="a", lane=Lane.LIVE) for _ in range(3)]
        await started.wait()
    await scheduler.close()

    assert running.cancelled()
    assert all(future.cancelled() for future in queued)
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.submit(Job("late"), agency_id="a", lane=Lane.LIVE)


async def test_drain_waits_for_the_work_or_gives_up_at_the_timeout(
    make_scheduler: MakeScheduler,
) -> None:
    async with make_scheduler(
        concurrency=1, default_rate_limit=RateLimit(rate_per_second=1, burst=1)
    ) as scheduler:
        futures = [scheduler.submit(Job("x"), agency_id="a", lane=Lane.LIVE) for _ in range(3)]
        assert not await scheduler.drain(0.05)
        assert futures[0].done()
        assert not futures[2].done()

    async with make_scheduler() as scheduler:
        futures = [scheduler.submit(Job("x"), agency_id="a", lane=Lane.LIVE) for _ in range(3)]
        assert await scheduler.drain(1.0)
        assert all(future.done() for future in futures)


async def test_a_job_cancelled_by_its_caller_never_runs(make_scheduler: MakeScheduler) -> None:
    withdrawn, kept = Job("withdrawn"), Job("kept")
    scheduler = make_scheduler()
    scheduler.submit(withdrawn, agency_id="a", lane=Lane.LIVE).cancel()
    future = scheduler.submit(kept, agency_id="a", lane=Lane.LIVE)
    async with scheduler:
        assert await all_done([future]) == ["kept"]
        assert await scheduler.drain(1.0)

    assert not withdrawn.attempts


async def test_snapshot_reports_backlog_by_lane_and_agency(make_scheduler: MakeScheduler) -> None:
    scheduler = make_scheduler()
    for agency, lane, count in [("a", Lane.LIVE, 2), ("a", Lane.BACKFILL, 5), ("b", Lane.LIVE, 1)]:
        for _ in range(count):
            scheduler.submit(Job("x"), agency_id=agency, lane=lane)
    await eventually(lambda: scheduler.snapshot().oldest_pending_seconds[Lane.LIVE] != 0.0)

    snapshot = scheduler.snapshot()

    assert snapshot.queued == {Lane.LIVE: {"a": 2, "b": 1}, Lane.BACKFILL: {"a": 5}}
    assert snapshot.running == {}
    assert all(age is not None and age > 0 for age in snapshot.oldest_pending_seconds.values())
    assert snapshot.breakers == {"a": BreakerState.CLOSED, "b": BreakerState.CLOSED}
    async with scheduler:
        assert await scheduler.drain(1.0)
    assert scheduler.snapshot().oldest_pending_seconds == {Lane.LIVE: None, Lane.BACKFILL: None}
    assert scheduler.snapshot().queued == {Lane.LIVE: {}, Lane.BACKFILL: {}}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    jobs=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from(list(Lane)),
            st.integers(min_value=0, max_value=4),  # retriable failures before success
        ),
        min_size=1,
        max_size=30,
    ),
    concurrency=st.integers(min_value=1, max_value=4),
)
async def test_every_future_completes_exactly_once_with_its_result(
    jobs: list[tuple[str, Lane, int]], concurrency: int
) -> None:
    breaker = BreakerPolicy(failure_threshold=4, cooldown_seconds=0.002, max_cooldown_seconds=0.004)
    retry = RetryPolicy(max_attempts=2, base_seconds=0.001, cap_seconds=0.002)
    calls = [Job(f"job-{index}", failing(failures)) for index, (_, _, failures) in enumerate(jobs)]
    completions: Counter[int] = Counter()
    futures: list[asyncio.Future[str]] = []

    def completed(future: asyncio.Future[str]) -> None:
        completions.update([futures.index(future)])

    async with Scheduler(concurrency=concurrency, retry=retry, breaker=breaker) as scheduler:
        for (agency, lane, _), call in zip(jobs, calls, strict=True):
            futures.append(scheduler.submit(call, agency_id=agency, lane=lane))
            futures[-1].add_done_callback(completed)
        results = await all_done(futures)
        assert await scheduler.drain(1.0)

    assert results == [call.name for call in calls]
    assert completions == Counter(range(len(jobs)))
    assert [len(call.attempts) for call in calls] == [failures + 1 for _, _, failures in jobs]


# -- operator pause ----------------------------------------------------------------------------


async def test_a_paused_agency_sends_nothing_and_resumes_with_exactly_what_waited(
    make_scheduler: MakeScheduler,
) -> None:
    paused_jobs = [Job(f"paused-{i}") for i in range(6)]
    other = [Job(f"other-{i}") for i in range(6)]
    scheduler = make_scheduler(concurrency=2)
    scheduler.set_paused(frozenset({"a"}))
    async with scheduler:
        waiting = [
            scheduler.submit(job, agency_id="a", lane=lane)
            for job, lane in zip(paused_jobs, [Lane.LIVE, Lane.BACKFILL] * 3, strict=True)
        ]
        await all_done([scheduler.submit(j, agency_id="b", lane=Lane.LIVE) for j in other])
        assert all(job.attempts == [] for job in paused_jobs)
        assert not any(future.done() for future in waiting)
        snapshot = scheduler.snapshot()
        assert snapshot.paused == {"a"}
        assert snapshot.queued[Lane.LIVE]["a"] + snapshot.queued[Lane.BACKFILL]["a"] == 6

        scheduler.set_paused(frozenset())

        assert sorted(await all_done(waiting)) == sorted(job.name for job in paused_jobs)
    assert [len(job.attempts) for job in paused_jobs] == [1] * 6


async def test_a_lookup_that_sends_nothing_goes_while_its_agency_is_paused(
    make_scheduler: MakeScheduler,
) -> None:
    upload, lookup = Job("upload"), Job("lookup")
    scheduler = make_scheduler(concurrency=1)
    scheduler.set_paused(frozenset({"a"}))
    async with scheduler:
        waiting = scheduler.submit(upload, agency_id="a", lane=Lane.LIVE)
        assert await all_done(
            [scheduler.submit(lookup, agency_id="a", lane=Lane.LIVE, gated=False)]
        ) == ["lookup"]
        assert upload.attempts == []
        scheduler.set_paused(frozenset())
        assert await all_done([waiting]) == ["upload"]


async def test_a_backfill_only_pause_holds_the_backfill_lane_while_live_jobs_go(
    make_scheduler: MakeScheduler,
) -> None:
    backfill = [Job(f"backfill-{i}") for i in range(4)]
    live = [Job(f"live-{i}") for i in range(4)]
    scheduler = make_scheduler(concurrency=2)
    scheduler.set_paused(frozenset(), backfill_only=frozenset({"a"}))
    async with scheduler:
        waiting = [scheduler.submit(job, agency_id="a", lane=Lane.BACKFILL) for job in backfill]
        sent = [scheduler.submit(job, agency_id="a", lane=Lane.LIVE) for job in live]
        assert sorted(await all_done(sent)) == sorted(job.name for job in live)
        assert all(job.attempts == [] for job in backfill)
        assert not any(future.done() for future in waiting)
        assert scheduler.snapshot().backfill_paused == {"a"}

        scheduler.set_paused(frozenset())

        assert sorted(await all_done(waiting)) == sorted(job.name for job in backfill)


async def test_a_backfill_pause_holds_the_backfill_lane_s_lookups_too(
    make_scheduler: MakeScheduler,
) -> None:
    """A lookup of the backfill lane goes neither under a backfill-only pause nor under a full
    one; one of the live lane goes under either."""
    scheduler = make_scheduler(concurrency=2)
    scheduler.set_paused(frozenset({"b"}), backfill_only=frozenset({"a"}))
    held = {agency: Job(f"backfill-lookup-{agency}") for agency in ("a", "b")}
    live = {agency: Job(f"live-lookup-{agency}") for agency in ("a", "b")}
    async with scheduler:
        waiting = [
            scheduler.submit(job, agency_id=agency, lane=Lane.BACKFILL, gated=False)
            for agency, job in held.items()
        ]
        sent = [
            scheduler.submit(job, agency_id=agency, lane=Lane.LIVE, gated=False)
            for agency, job in live.items()
        ]
        assert sorted(await all_done(sent)) == ["live-lookup-a", "live-lookup-b"]
        assert all(job.attempts == [] for job in held.values())
        assert not any(future.done() for future in waiting)

        scheduler.set_paused(frozenset())

        assert sorted(await all_done(waiting)) == ["backfill-lookup-a", "backfill-lookup-b"]
