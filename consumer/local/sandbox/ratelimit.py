"""The sandbox's rate limiting: a token bucket per API key, and the Retry-After each key was given.

A key over its limit gets 429 with Retry-After; any request it sends before that time has passed
is answered 429 again and counted as early, which is how the tests see a client that does not
wait as it was told.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from consumer.local.sandbox.accounts import RateLimit


@dataclass(slots=True)
class TokenBucket:
    limit: RateLimit
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one is available."""
        self.tokens = min(
            self.limit.burst, self.tokens + (now - self.updated) * self.limit.rate_per_s
        )
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.limit.rate_per_s


class KeyLimits:
    """Every key's bucket and Retry-After; ``default`` applies to keys without their own limit."""

    def __init__(self, default: RateLimit | None) -> None:
        self.default = default
        self._buckets: dict[str, TokenBucket] = {}
        self._not_before: dict[str, float] = {}
        self._early: Counter[str] = Counter()

    def early_wait(self, api_key: str, now: float) -> float:
        """What is left of the key's Retry-After (a request now is counted as early), or 0."""
        if now < self._not_before.get(api_key, -math.inf):
            self._early[api_key] += 1
            return self._not_before[api_key] - now
        return 0.0

    def wait(self, api_key: str, own: RateLimit | None, now: float) -> float:
        """0 when the key may send now (a token is taken), else the seconds until it may."""
        limit = own or self.default
        if limit is None:
            return 0.0
        bucket = self._buckets.get(api_key)
        if bucket is None or bucket.limit != limit:
            bucket = self._buckets[api_key] = TokenBucket(limit, float(limit.burst), now)
        return bucket.take(now)

    def retry_after(self, api_key: str | None, now: float, wait: float) -> int:
        """The Retry-After seconds for ``wait``; a request from the key before then is early."""
        retry_after = max(1, math.ceil(wait))
        if api_key is not None:
            self._not_before[api_key] = max(self._not_before.get(api_key, now), now + retry_after)
        return retry_after

    def reset_buckets(self) -> None:
        self._buckets.clear()

    def early_count(self, api_key: str | None = None) -> int:
        return self._early[api_key] if api_key is not None else sum(self._early.values())
