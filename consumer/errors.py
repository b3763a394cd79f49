"""The relay's exception tree.

Every failure says what the caller should do with it: retry later (``retriable``), park the work
until an operator fixes something (``needs_operator``), stop the relay (``fatal``: infrastructure
or configuration), or dead-letter the input that caused it. ``consumer.failures`` reads these
into one verdict for every exception, foreseen or not.
"""

from __future__ import annotations

from typing import ClassVar


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""

    retriable: ClassVar[bool] = False
    needs_operator: ClassVar[bool] = False
    fatal: ClassVar[bool] = False


class ConfigError(RelayError):
    """Configuration that cannot work; start-up stops with this message."""

    fatal = True


class PartnerError(RelayError):
    """A call to ChouetteCopro failed."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PartnerRetriableError(PartnerError):
    """Transient: network failure, 5xx, 429. Retry after a backoff (or ``retry_after``).

    ``in_doubt``: a create or an update was sent and no answer says what became of it (a
    timeout, a connection lost after sending, a gateway's 502 or 504). The partner may still
    carry it out later (a second copy, or an update landing after the next one), so it is not
    tried again (nor looked up) before the partner is surely done with it.
    """

    retriable = True

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        in_doubt: bool = False,
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after
        self.in_doubt = in_doubt


class PartnerParkedError(PartnerError):
    """Needs an operator: bad credentials (401/403), unmapped building, missing API key."""

    needs_operator = True


class PartnerRejectedError(PartnerError):
    """The partner refused this document for good (422): dead-letter it."""


class RemoteIdError(RelayError):
    """An id the relay was given for a ChouetteCopro resource (from its view, a command, the
    routing file) that is not of the contract's form: a path, a query, a dot segment. Refused
    before any request is made with it; the document it belongs to is parked for an operator.
    Not the partner's failure: it tells an agency's circuit breaker nothing."""

    needs_operator = True


class ContentError(RelayError):
    """The document content cannot be used: wrong sha256 or size, host not allowed, too large,
    a URL the HTTP stack cannot parse (``reason="bad_url"``), an encoding not asked for."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ContentUnavailableError(ContentError):
    """The document store did not answer or answered 5xx: retry later."""

    retriable = True


class KafkaConnectError(ConfigError):
    """Kafka refused or did not answer at start-up; the message names the settings to check."""


class KafkaUnavailableError(RelayError):
    """The broker (or the state topic) stayed unreachable beyond the configured bound: stop.

    An outage shorter than the bound is ridden out inside the process; this one is for the
    orchestrator, and the message names what could not be reached and for how long.
    """
