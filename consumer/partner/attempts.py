"""How one attempt of a partner job ends, when it is tried again, and who hears of it.

``RetryPolicy`` bounds the attempts of a round and jitters the backoff between them; the
scheduler reports each attempt's ``Outcome`` and each ``RetryReason`` to a ``SchedulerObserver``
(the relay maps them to metrics).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from consumer.core.planning.plan import Lane
from consumer.errors import ConfigError
from consumer.partner.breaker import BreakerState


class Outcome(StrEnum):
    """How one attempt of a job ended."""

    SUCCEEDED = "succeeded"
    RETRYING = "retrying"  # retriable failure, retried after a backoff or Retry-After
    REQUEUED = "requeued"  # retriable failure ending a round: back in the queue behind the breaker
    FAILED = "failed"  # final failure: the future holds the error
    PARKED = "parked"  # needs an operator: the future holds the error, nothing is retried
    CANCELLED = "cancelled"


class RetryReason(StrEnum):
    """Why a job is tried again."""

    BACKOFF = "backoff"
    RETRY_AFTER = "retry_after"
    ROUND_EXHAUSTED = "round_exhausted"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Attempts per round and the jittered exponential backoff between them.

    ``in_doubt_seconds``: the least wait after an attempt whose outcome is in doubt (sent, no
    answer): the partner may still carry the request out meanwhile, and the next attempt's
    lookup must see it, or the document is created twice.
    """

    max_attempts: int = 5
    base_seconds: float = 0.5
    cap_seconds: float = 30.0
    in_doubt_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 < self.base_seconds <= self.cap_seconds:
            raise ConfigError("need 0 < base_seconds <= cap_seconds")
        if self.in_doubt_seconds < 0:
            raise ConfigError(f"in_doubt_seconds must be >= 0, got {self.in_doubt_seconds}")

    def delay(self, failures: int, rng: random.Random) -> float:
        """Backoff after the ``failures``-th failure of a round, in [d/2, d].

        ``d = min(cap, base * 2 ** (failures - 1))``; the jitter spreads out the retries of jobs
        that failed together.
        """
        ceiling = min(self.cap_seconds, self.base_seconds * 2.0 ** min(failures - 1, 64))
        return rng.uniform(ceiling / 2, ceiling)


class SchedulerObserver(Protocol):
    """Receives what the scheduler does; the relay maps it to metrics. Must not block or raise."""

    def job_started(self, agency: str, lane: Lane) -> None:
        """An attempt (one partner request) starts."""

    def job_finished(self, agency: str, lane: Lane, outcome: Outcome, seconds: float) -> None:
        """An attempt ended after ``seconds``."""

    def retry(self, agency: str, reason: RetryReason) -> None:
        """A failed job will be tried again."""

    def breaker_changed(self, agency: str, state: BreakerState) -> None:
        """An agency's breaker changed state."""


class NoObserver:
    def job_started(self, agency: str, lane: Lane) -> None:
        pass

    def job_finished(self, agency: str, lane: Lane, outcome: Outcome, seconds: float) -> None:
        pass

    def retry(self, agency: str, reason: RetryReason) -> None:
        pass

    def breaker_changed(self, agency: str, state: BreakerState) -> None:
        pass
