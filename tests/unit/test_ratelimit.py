"""The per-agency token bucket: rate, burst, unlimited agencies and Retry-After pauses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.errors import ConfigError
from consumer.partner.ratelimit import RateLimit, TokenBucket


def test_a_full_bucket_allows_a_burst_then_refuses() -> None:
    bucket = TokenBucket(RateLimit(rate_per_second=2, burst=3), now=0.0)

    assert [bucket.try_take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.available_at(0.0) == pytest.approx(0.5)


def test_tokens_come_back_at_the_configured_rate() -> None:
    bucket = TokenBucket(RateLimit(rate_per_second=4, burst=1), now=10.0)
    assert bucket.try_take(10.0)

    assert not bucket.try_take(10.2)
    assert bucket.available_at(10.2) == pytest.approx(10.25)
    assert bucket.try_take(10.25)


def test_an_idle_bucket_fills_up_to_the_burst_and_no_further() -> None:
    bucket = TokenBucket(RateLimit(rate_per_second=10, burst=2), now=0.0)

    granted = sum(bucket.try_take(100.0) for _ in range(5))

    assert granted == 2


@pytest.mark.parametrize("rate", [None, 0.0])
def test_no_rate_means_unlimited(rate: float | None) -> None:
    bucket = TokenBucket(RateLimit(rate_per_second=rate), now=0.0)

    assert all(bucket.try_take(0.0) for _ in range(10_000))
    assert bucket.available_at(0.0) == 0.0


def test_a_pause_hands_out_nothing_before_it_ends_and_one_token_when_it_does() -> None:
    bucket = TokenBucket(RateLimit(rate_per_second=1, burst=5), now=0.0)
    bucket.pause_until(30.0, now=0.0)

    assert not bucket.try_take(29.999)
    assert bucket.available_at(1.0) == 30.0
    assert bucket.try_take(30.0)
    assert not bucket.try_take(30.0)  # no burst right after a 429
    assert bucket.available_at(30.0) == pytest.approx(31.0)


def test_a_pause_applies_to_an_unlimited_agency_too() -> None:
    bucket = TokenBucket(RateLimit(), now=0.0)
    bucket.pause_until(2.0, now=0.0)

    assert not bucket.try_take(1.0)
    assert bucket.available_at(1.0) == 2.0
    assert bucket.try_take(2.0)


def test_a_shorter_pause_never_cuts_a_longer_one() -> None:
    bucket = TokenBucket(RateLimit(), now=0.0)
    bucket.pause_until(5.0, now=0.0)
    bucket.pause_until(1.0, now=0.5)

    assert bucket.paused_until == 5.0
    assert not bucket.try_take(4.0)


@pytest.mark.parametrize(
    ("rate", "burst"), [(-1.0, 1), (float("nan"), 1), (float("inf"), 1), (1.0, 0)]
)
def test_impossible_limits_are_refused(rate: float, burst: int) -> None:
    with pytest.raises(ConfigError):
        RateLimit(rate_per_second=rate, burst=burst)


@given(
    rate=st.floats(min_value=0.5, max_value=50),
    burst=st.integers(min_value=1, max_value=5),
    steps=st.lists(st.floats(min_value=0, max_value=0.3), min_size=1, max_size=200),
    pauses=st.lists(st.tuples(st.integers(0, 199), st.floats(0, 1)), max_size=5),
)
def test_no_window_ever_sees_more_than_burst_plus_rate_times_its_length(
    rate: float, burst: int, steps: list[float], pauses: list[tuple[int, float]]
) -> None:
    bucket = TokenBucket(RateLimit(rate_per_second=rate, burst=burst), now=0.0)
    pause_at = dict(pauses)
    now, sent = 0.0, []
    for index, step in enumerate(steps):
        now += step
        if index in pause_at:
            bucket.pause_until(now + pause_at[index], now=now)
        while bucket.try_take(now):
            sent.append(now)

    for first, start in enumerate(sent):
        for last in range(first, len(sent)):
            length = sent[last] - start
            assert last - first + 1 <= burst + rate * length + 1e-6


def test_a_share_of_a_rate_is_that_part_of_it_without_a_burst() -> None:
    assert RateLimit(rate_per_second=10, burst=20).share(0.2) == RateLimit(2.0, burst=1)
    assert RateLimit().share(0.2).unlimited
    for share in (0.0, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="share"):
            RateLimit(rate_per_second=10).share(share)


def test_a_share_of_a_rate_scales_its_burst_too_never_below_one() -> None:
    limit = RateLimit(rate_per_second=10.0, burst=5)

    assert limit.scaled(0.5) == RateLimit(rate_per_second=5.0, burst=2)
    assert limit.scaled(0.1) == RateLimit(rate_per_second=1.0, burst=1)
    assert limit.scaled(1.0) is limit
    assert RateLimit().scaled(0.25) == RateLimit()  # unlimited stays unlimited
    with pytest.raises(ConfigError):
        limit.scaled(0.0)


def test_a_retuned_bucket_keeps_what_it_earned_up_to_its_new_burst() -> None:
    bucket = TokenBucket(RateLimit(rate_per_second=10.0, burst=10), now=0.0)
    assert sum(bucket.try_take(0.0) for _ in range(10)) == 10

    bucket.retune(RateLimit(rate_per_second=2.0, burst=1), now=0.3)  # 3 tokens earned, 1 kept

    assert bucket.try_take(0.3)
    assert not bucket.try_take(0.3)
    assert bucket.available_at(0.3) == pytest.approx(0.8)  # at the new rate
