"""The per-agency circuit breaker: opening, cool-down, the single half-open probe, escalation."""

from __future__ import annotations

import pytest

from consumer.errors import ConfigError
from consumer.partner.breaker import BreakerPolicy, BreakerState, CircuitBreaker

POLICY = BreakerPolicy(failure_threshold=3, cooldown_seconds=10.0, max_cooldown_seconds=25.0)


@pytest.fixture
def changes() -> list[BreakerState]:
    return []


@pytest.fixture
def breaker(changes: list[BreakerState]) -> CircuitBreaker:
    return CircuitBreaker(POLICY, on_change=changes.append)


def fail(breaker: CircuitBreaker, now: float, times: int = 1) -> None:
    for _ in range(times):
        probe = breaker.start(now)
        breaker.record_failure(now, probe=probe)


def test_opens_after_consecutive_failures_only(breaker: CircuitBreaker) -> None:
    fail(breaker, 0.0, times=2)
    breaker.record_success(probe=breaker.start(0.0))
    fail(breaker, 0.0, times=2)
    assert breaker.state(0.0) is BreakerState.CLOSED

    fail(breaker, 1.0)

    assert breaker.state(1.0) is BreakerState.OPEN
    assert not breaker.allows(10.999)
    assert breaker.reopens_at(5.0) == 11.0


def test_after_the_cooldown_exactly_one_probe_goes(breaker: CircuitBreaker) -> None:
    fail(breaker, 0.0, times=3)

    assert breaker.allows(10.0)
    assert breaker.start(10.0) is True
    assert not breaker.allows(10.0)
    assert breaker.reopens_at(10.0) is None  # only the probe's result can open the way


def test_a_successful_probe_closes_and_resets_the_cooldown(
    breaker: CircuitBreaker, changes: list[BreakerState]
) -> None:
    fail(breaker, 0.0, times=3)
    fail(breaker, 10.0)  # failed probe: open for 20 s
    breaker.record_success(probe=breaker.start(30.0))

    assert breaker.state(30.0) is BreakerState.CLOSED
    assert changes == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]
    fail(breaker, 40.0, times=3)
    assert breaker.reopens_at(40.0) == 50.0


def test_failed_probes_reopen_for_longer_up_to_the_cap(breaker: CircuitBreaker) -> None:
    fail(breaker, 0.0, times=3)
    reopenings = []
    now = 10.0
    for _ in range(3):
        fail(breaker, now)
        reopen = breaker.reopens_at(now)
        assert reopen is not None
        reopenings.append(reopen - now)
        now = reopen

    assert reopenings == [20.0, 25.0, 25.0]


def test_late_results_of_requests_sent_before_opening_are_ignored(
    breaker: CircuitBreaker,
) -> None:
    late = breaker.start(0.0)
    fail(breaker, 0.0, times=3)

    breaker.record_success(probe=late)
    assert breaker.state(1.0) is BreakerState.OPEN
    breaker.record_failure(11.0, probe=late)
    assert breaker.state(11.0) is BreakerState.HALF_OPEN
    assert breaker.allows(11.0)


def test_a_released_probe_lets_another_one_go(breaker: CircuitBreaker) -> None:
    fail(breaker, 0.0, times=3)
    breaker.release_probe(probe=breaker.start(10.0))

    assert breaker.allows(10.0)
    assert breaker.state(10.0) is BreakerState.HALF_OPEN


def test_trip_opens_a_closed_breaker_at_once(breaker: CircuitBreaker) -> None:
    breaker.trip(5.0)

    assert breaker.state(5.0) is BreakerState.OPEN
    assert breaker.reopens_at(5.0) == 15.0


@pytest.mark.parametrize(
    ("threshold", "cooldown", "cap"), [(0, 1.0, 1.0), (1, 0.0, 1.0), (1, 2.0, 1.0)]
)
def test_impossible_policies_are_refused(threshold: int, cooldown: float, cap: float) -> None:
    with pytest.raises(ConfigError):
        BreakerPolicy(
            failure_threshold=threshold, cooldown_seconds=cooldown, max_cooldown_seconds=cap
        )
