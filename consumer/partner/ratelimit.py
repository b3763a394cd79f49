"""Per-agency token bucket: how fast the relay may call ChouetteCopro with one agency's API key.

The bucket is pure: the caller passes the current (monotonic) time to every method. A token is
taken at the moment a request is sent, so over any window of ``w`` seconds an agency sends at most
``burst + rate_per_second * w`` requests, retries included. A Retry-After from the partner pauses
the bucket: no token is handed out before the pause ends, and at most one right when it ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from consumer.errors import ConfigError

# Refills are float sums; without a little slack a bucket could wait a few nanoseconds for the
# last billionth of a token it already earned.
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A request rate for one agency. ``rate_per_second`` of None or 0 means unlimited."""

    rate_per_second: float | None = None
    burst: int = 1

    def __post_init__(self) -> None:
        if self.rate_per_second is not None and not (
            math.isfinite(self.rate_per_second) and self.rate_per_second >= 0
        ):
            raise ConfigError(f"rate_per_second must be >= 0, got {self.rate_per_second}")
        if self.burst < 1:
            raise ConfigError(f"burst must be >= 1, got {self.burst}")

    @property
    def unlimited(self) -> bool:
        """True when no rate applies (Retry-After pauses still do)."""
        return not self.rate_per_second

    def share(self, fraction: float) -> RateLimit:
        """``fraction`` of this rate with a burst of one: the cap of a side activity (an audit)
        that must never take more than that part of the agency's requests."""
        if not (math.isfinite(fraction) and 0 < fraction <= 1):
            raise ConfigError(f"a share of a rate must be in (0, 1], got {fraction}")
        if self.rate_per_second is None:
            return RateLimit()
        return RateLimit(self.rate_per_second * fraction, burst=1)

    def scaled(self, fraction: float) -> RateLimit:
        """``fraction`` of this rate and of its burst (at least one): what one replica may send
        when the agency's rate is shared between replicas."""
        if not (math.isfinite(fraction) and 0 < fraction <= 1):
            raise ConfigError(f"a share of a rate must be in (0, 1], got {fraction}")
        if self.unlimited or fraction == 1:
            return self
        burst = max(1, math.floor(self.burst * fraction + _EPSILON))
        return RateLimit(self.rate_per_second * fraction, burst=burst)  # type: ignore[operator]


class TokenBucket:
    """Hands out request tokens at a fixed rate, starting full (``burst`` tokens)."""

    def __init__(self, limit: RateLimit, *, now: float) -> None:
        self._rate = limit.rate_per_second or 0.0
        self._burst = float(limit.burst)
        self._tokens = self._burst
        self._updated = now
        self._paused_until = -math.inf

    @property
    def paused_until(self) -> float:
        """Monotonic time before which no request may be sent (``-inf`` when never paused)."""
        return self._paused_until

    def try_take(self, now: float) -> bool:
        """Take one token if one is available at ``now``; the request must be sent right away."""
        if now < self._paused_until:
            return False
        if not self._rate:
            return True
        self._refill(now)
        if self._tokens < 1.0 - _EPSILON:
            return False
        self._tokens = max(0.0, self._tokens - 1.0)
        return True

    def available_at(self, now: float) -> float:
        """The earliest time (``>= now``) at which ``try_take`` can succeed."""
        ready = max(now, self._paused_until)
        if not self._rate:
            return ready
        self._refill(now)
        missing = max(0.0, 1.0 - self._tokens)
        # Before a pause ends tokens do not accrue (see pause_until), so count from there.
        return max(ready, max(now, self._updated) + missing / self._rate)

    def retune(self, limit: RateLimit, *, now: float) -> None:
        """Go on at ``limit`` from ``now``: what was earned so far is kept, up to the new burst."""
        self._refill(now)
        self._rate = limit.rate_per_second or 0.0
        self._burst = float(limit.burst)
        self._tokens = min(self._tokens, self._burst)

    def pause_until(self, until: float, *, now: float) -> None:
        """Send nothing before ``until``, then resume at the configured rate with one token.

        The partner's Retry-After is for the whole API key, so this pauses the agency, not a
        request. Ending the pause with at most one token (never more than the bucket would hold
        anyway) avoids answering a 429 with a burst.
        """
        if until <= self._paused_until:
            return
        self._paused_until = until
        if not self._rate:
            return
        self._refill(now)
        at_until = min(self._burst, self._tokens + max(0.0, until - self._updated) * self._rate)
        self._tokens = min(1.0, at_until)
        self._updated = max(until, self._updated)

    def _refill(self, now: float) -> None:
        if now > self._updated:
            self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
            self._updated = now
