"""Adapters from the scheduler's and the partner client's events to the relay's metrics.

Also derives the per-agency rate limits from the routing table and the partner settings.
"""

from __future__ import annotations

from consumer.core.routing import RoutingTable
from consumer.metrics import RelayMetrics
from consumer.partner.breaker import BreakerState
from consumer.partner.ratelimit import RateLimit
from consumer.partner.scheduler import Lane, Outcome, RetryReason
from consumer.settings import PartnerSettings


class MetricsObserver:
    """Implements the scheduler's observer protocol and the client's ``observe`` callback."""

    def __init__(self, metrics: RelayMetrics) -> None:
        self._metrics = metrics

    def job_started(self, agency: str, lane: Lane) -> None:
        pass

    def job_finished(self, agency: str, lane: Lane, outcome: Outcome, seconds: float) -> None:
        pass

    def retry(self, agency: str, reason: RetryReason) -> None:
        self._metrics.partner_retries.labels(reason.value).inc()

    def breaker_changed(self, agency: str, state: BreakerState) -> None:
        self._metrics.circuit_open.labels(agency).set(1 if state is BreakerState.OPEN else 0)

    def request(self, operation: str, status: str, seconds: float) -> None:
        self._metrics.partner_requests.labels(operation, status).inc()
        self._metrics.partner_latency.labels(operation).observe(seconds)


def rate_limits(
    routing: RoutingTable, partner: PartnerSettings
) -> tuple[RateLimit, dict[str, RateLimit]]:
    """The default rate limit and the per-agency overrides from the routing file."""
    default = RateLimit(partner.default_rate_per_second, partner.default_burst)
    limits = {}
    for agency_id, agency in routing.agencies.items():
        if agency.rate_per_second is not None:
            limits[agency_id] = RateLimit(
                agency.rate_per_second, agency.burst or partner.default_burst
            )
    return default, limits
