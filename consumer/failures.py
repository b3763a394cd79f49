"""The one place that decides what a failure means: retry, park, dead-letter, or stop the relay.

Every edge (partner client, content fetcher, changelog and dead-letter writes, the planning of one
input record) raises what it raises; ``classify`` turns any exception into a ``Verdict`` with a
disposition and a machine-readable reason, and callers act on the verdict instead of catching
exception types of their own. Only infrastructure (the broker or the state topic unreachable once
the producer's bounded retry is spent, a configuration that cannot work) is fatal; anything that
belongs to one record or one document ends parked or dead-lettered, and its offset is released.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import aiohttp
from aiokafka.errors import KafkaError

from consumer.core.state import StateDecodeError
from consumer.errors import (
    ConfigError,
    ContentError,
    ContentUnavailableError,
    KafkaConnectError,
    KafkaUnavailableError,
    PartnerError,
    PartnerParkedError,
    PartnerRejectedError,
    PartnerRetriableError,
    RelayError,
    RemoteIdError,
)


class Disposition(StrEnum):
    """What the caller does with the work that failed."""

    RETRY = "retry"  # transient: try again after a jittered backoff, a bounded number of times
    PARK = "park"  # keep the work until an operator fixes something; release the offset
    DEAD_LETTER = "dead_letter"  # the input can never work: dead-letter it, release the offset
    FATAL = "fatal"  # infrastructure: stop the process with a clear log line


class Scope(StrEnum):
    """Whose work failed, which decides whether an input record can be blamed."""

    RECORD = "record"  # planning one input record: nothing of it is durable yet
    DOCUMENT = "document"  # a document's partner work caused by an input record
    RELAY = "relay"  # work without an input record of its own: a withdrawal, a parked retry


@dataclass(frozen=True, slots=True)
class Verdict:
    """A failure's disposition and machine-readable reason (a metric label, a dead-letter reason).

    ``from_partner`` says whether ChouetteCopro's answer (or its silence) caused it: only those
    failures tell an agency's circuit breaker anything. ``expected`` is False for exceptions no
    edge foresaw: they are logged with their traceback.
    """

    disposition: Disposition
    reason: str
    from_partner: bool = False
    expected: bool = True


UNEXPECTED_RECORD_REASON = "unexpected_error"
"""The dead-letter reason of an input record whose planning failed in a way no edge foresaw."""


def classify(error: Exception, scope: Scope = Scope.DOCUMENT) -> Verdict:
    """The verdict on ``error`` raised by work of ``scope``; never raises."""
    verdict = _classify(error)
    if verdict.disposition is Disposition.DEAD_LETTER and scope is Scope.RELAY:
        # No input record to set aside (a withdrawal, a retry the relay started itself): the
        # work stays parked with the refusal, for an operator to see.
        return Verdict(Disposition.PARK, verdict.reason, verdict.from_partner, verdict.expected)
    if scope is Scope.RECORD and verdict.disposition in (Disposition.RETRY, Disposition.PARK):
        # Planning one record calls nothing that may fail for a while or need an operator:
        # whatever got here is a surprise, and the record is set aside for a person to read.
        return Verdict(Disposition.DEAD_LETTER, UNEXPECTED_RECORD_REASON, expected=False)
    return verdict


def _classify(error: Exception) -> Verdict:
    if isinstance(error, RelayError):
        return _relay_error(error)
    if isinstance(error, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return Verdict(Disposition.DEAD_LETTER, "bad_url")
    if isinstance(error, aiohttp.ClientError | TimeoutError):
        # The edges wrap their own network errors; one that escaped is transient all the same.
        return Verdict(Disposition.RETRY, "network")
    if isinstance(error, KafkaError):
        # The producer already retried within its delivery timeout: the broker or the state
        # topic is unreachable, and nothing is durable without it.
        return Verdict(Disposition.FATAL, "kafka_unavailable")
    return unexpected(error)


_RELAY_ERRORS: tuple[tuple[type[RelayError], Verdict], ...] = (
    # Most specific first: the first class the error is an instance of decides.
    (KafkaConnectError, Verdict(Disposition.FATAL, "kafka_unreachable")),
    (KafkaUnavailableError, Verdict(Disposition.FATAL, "kafka_unavailable")),
    (ConfigError, Verdict(Disposition.FATAL, "config_error")),
    (StateDecodeError, Verdict(Disposition.FATAL, "state_unreadable")),
    (PartnerRetriableError, Verdict(Disposition.RETRY, "partner_unavailable", from_partner=True)),
    (PartnerParkedError, Verdict(Disposition.PARK, "partner_refused", from_partner=True)),
    (PartnerRejectedError, Verdict(Disposition.DEAD_LETTER, "partner_rejected", from_partner=True)),
    (PartnerError, Verdict(Disposition.PARK, "partner_refused", from_partner=True)),
    (RemoteIdError, Verdict(Disposition.PARK, "bad_remote_id")),
    (ContentUnavailableError, Verdict(Disposition.RETRY, "content_unavailable")),
)


def _relay_error(error: RelayError) -> Verdict:
    for kind, verdict in _RELAY_ERRORS:
        if isinstance(error, kind):
            return verdict
    if isinstance(error, ContentError):
        reason = "bad_url" if error.reason == "bad_url" else "content_rejected"
        return Verdict(Disposition.DEAD_LETTER, reason)
    if error.fatal:
        return Verdict(Disposition.FATAL, "infrastructure")
    if error.retriable:
        return Verdict(Disposition.RETRY, "retriable")
    if error.needs_operator:
        return Verdict(Disposition.PARK, "needs_operator")
    return unexpected(error)


def unexpected(error: BaseException) -> Verdict:
    """An exception no edge foresaw: the document it belongs to is parked, never the relay."""
    return Verdict(Disposition.PARK, f"unexpected:{type(error).__name__}", expected=False)
