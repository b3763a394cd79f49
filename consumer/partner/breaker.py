"""Per-agency circuit breaker: stop calling a partner account that keeps failing, then probe it.

The breaker opens after a run of consecutive retriable failures and stays open for a cool-down.
Then it is half-open: exactly one probe request may go; its success closes the breaker, its
failure reopens it with a longer cool-down (doubled, capped). The breaker is pure: the caller
passes the current monotonic time, and state changes are reported through ``on_change``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from consumer.errors import ConfigError


class BreakerState(StrEnum):
    """Where a breaker stands; the values are used as metric label values."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When a breaker opens and for how long."""

    failure_threshold: int = 5
    cooldown_seconds: float = 30.0
    max_cooldown_seconds: float = 600.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ConfigError(f"failure_threshold must be >= 1, got {self.failure_threshold}")
        if not (0 < self.cooldown_seconds <= self.max_cooldown_seconds < math.inf):
            raise ConfigError(
                "need 0 < cooldown_seconds <= max_cooldown_seconds, got "
                f"{self.cooldown_seconds} and {self.max_cooldown_seconds}"
            )


class CircuitBreaker:
    """The breaker of one agency.

    Results of requests that were sent while the breaker was closed but come back after it
    opened carry no news about the cool-down and are ignored; only the probe decides a half-open
    breaker.
    """

    def __init__(
        self,
        policy: BreakerPolicy,
        *,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self._policy = policy
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._cooldown = policy.cooldown_seconds
        self._open_until = -math.inf
        self._probe_in_flight = False

    def state(self, now: float) -> BreakerState:
        """The state at ``now``; an open breaker whose cool-down ended becomes half-open."""
        if self._state is BreakerState.OPEN and now >= self._open_until:
            self._set(BreakerState.HALF_OPEN)
        return self._state

    def allows(self, now: float) -> bool:
        """Whether a request may start now (for a half-open breaker: the probe, once)."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        return state is BreakerState.HALF_OPEN and not self._probe_in_flight

    def reopens_at(self, now: float) -> float | None:
        """When ``allows`` may turn true by itself; None if only a finishing probe can do it."""
        if self.allows(now):
            return now
        if self._state is BreakerState.OPEN:
            return self._open_until
        return None

    def start(self, now: float) -> bool:
        """Record that a request starts now; True if it is the half-open breaker's probe."""
        if self.state(now) is BreakerState.HALF_OPEN:
            self._probe_in_flight = True
            return True
        return False

    def record_success(self, *, probe: bool) -> None:
        """The partner answered (even with a definitive error): the account is reachable."""
        if self._state is BreakerState.CLOSED:
            self._failures = 0
        elif probe and self._state is BreakerState.HALF_OPEN:
            self._probe_in_flight = False
            self._failures = 0
            self._cooldown = self._policy.cooldown_seconds
            self._set(BreakerState.CLOSED)

    def record_failure(self, now: float, *, probe: bool) -> None:
        """A retriable failure: counts toward opening, or reopens after a failed probe."""
        if self._state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self._policy.failure_threshold:
                self._open(now)
        elif probe and self._state is BreakerState.HALF_OPEN:
            self._probe_in_flight = False
            self._cooldown = min(self._cooldown * 2, self._policy.max_cooldown_seconds)
            self._open(now)

    def release_probe(self, *, probe: bool) -> None:
        """The probe ended without telling anything (cancelled, paused): let another one go."""
        if probe and self._state is BreakerState.HALF_OPEN:
            self._probe_in_flight = False

    def trip(self, now: float) -> None:
        """Open a closed breaker now, whatever the failure count (a job ran out of attempts)."""
        if self._state is BreakerState.CLOSED:
            self._open(now)

    def _open(self, now: float) -> None:
        self._failures = 0
        self._open_until = now + self._cooldown
        self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        if state is not self._state:
            self._state = state
            if self._on_change is not None:
                self._on_change(state)
