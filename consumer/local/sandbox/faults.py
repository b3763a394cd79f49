"""Injected faults: latency, an outage, a 429 storm, and a random error rate, on every API request.

``Faults`` is the change asked for (from Python or ``POST /_sandbox/faults``), with durations
counted from the moment it is set; ``FaultInjector`` holds the faults in force and says, for one
request, which one hits it. The error rate is sampled from a seeded generator, so a run repeats.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Faults(BaseModel):
    """Injected faults; ``POST /_sandbox/faults`` takes the same fields (durations from now)."""

    model_config = ConfigDict(extra="forbid")

    error_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    latency_ms: float | None = Field(default=None, ge=0.0)
    outage_seconds: float | None = Field(default=None, ge=0.0)
    storm_seconds: float | None = Field(default=None, ge=0.0)
    storm_retry_after_s: int | None = Field(default=None, ge=1)


@dataclass(slots=True)
class _FaultState:
    error_rate: float = 0.0
    latency_ms: float = 0.0
    outage_until: float = -math.inf
    storm_until: float = -math.inf
    storm_retry_after_s: int | None = None


@dataclass(frozen=True, slots=True)
class InjectedFault:
    """The fault that hits one request: its status, and the wait to announce (None: no header)."""

    status: int
    detail: str
    wait_s: float | None


class FaultInjector:
    """The faults in force; ``clock`` is the sandbox's, ``seed`` makes the error rate repeatable."""

    def __init__(self, *, clock: Callable[[], float], seed: int) -> None:
        self._clock = clock
        self._random = random.Random(seed)  # noqa: S311 - fault sampling, not cryptography
        self._state = _FaultState()

    def set(self, change: Faults) -> None:
        """Change the given faults only."""
        now = self._clock()
        state = self._state
        if change.error_rate is not None:
            state.error_rate = change.error_rate
        if change.latency_ms is not None:
            state.latency_ms = change.latency_ms
        if change.outage_seconds is not None:
            state.outage_until = now + change.outage_seconds
        if change.storm_seconds is not None:
            state.storm_until = now + change.storm_seconds
        if change.storm_retry_after_s is not None:
            state.storm_retry_after_s = change.storm_retry_after_s

    def clear(self) -> None:
        self._state = _FaultState()

    @property
    def latency_ms(self) -> float:
        return self._state.latency_ms

    def injected(self, now: float) -> InjectedFault | None:
        """The fault that hits a request arriving ``now``, if any."""
        faults = self._state
        if now < faults.outage_until:
            return InjectedFault(503, "injected outage", faults.outage_until - now)
        if now < faults.storm_until:
            wait = faults.storm_retry_after_s or faults.storm_until - now
            return InjectedFault(429, "injected 429 storm", wait)
        if faults.error_rate and self._random.random() < faults.error_rate:
            return InjectedFault(503, "injected error", None)
        return None

    def describe(self, now: float) -> dict[str, Any]:
        """The faults in force, as ``GET /_sandbox/state`` shows them."""
        return {
            "error_rate": self._state.error_rate,
            "latency_ms": self._state.latency_ms,
            "outage_remaining_s": max(0.0, self._state.outage_until - now),
            "storm_remaining_s": max(0.0, self._state.storm_until - now),
        }
