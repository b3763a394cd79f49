"""The failure taxonomy: every exception an edge can raise has one disposition and one reason.

Only infrastructure is fatal; a partner's refusal parks, bad input dead-letters, transient
trouble retries (and only the partner's counts for its breaker), and anything no edge foresaw
parks the document it belongs to (or dead-letters the record being planned), never the relay.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import orjson
import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NodeNotReadyError,
    NotLeaderForPartitionError,
    ProducerClosed,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
)
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from consumer.core.deadletter import DEAD_LETTER_REASONS
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
from consumer.failures import Disposition, Scope, Verdict, classify
from consumer.local.kafka import LocalKafkaError

RETRY, PARK, DEAD_LETTER, FATAL = (
    Disposition.RETRY,
    Disposition.PARK,
    Disposition.DEAD_LETTER,
    Disposition.FATAL,
)


def _request_info() -> aiohttp.RequestInfo:
    url = URL("https://docs.lsc.example/d.pdf")
    return aiohttp.RequestInfo(url, "GET", CIMultiDictProxy(CIMultiDict()), url)


class _Key:
    """Stands for aiohttp's ConnectionKey in a connector error (only its repr is used)."""

    host, port, ssl = "docs.lsc.example", 443, True


def _aiohttp_errors() -> Iterator[tuple[Exception, Disposition, str]]:
    """Every aiohttp error an edge may let through, and what it must mean."""
    yield aiohttp.InvalidURL("http://127.0.0.1:70000/d.pdf"), DEAD_LETTER, "bad_url"
    yield aiohttp.InvalidUrlClientError("http://[::1/d.pdf"), DEAD_LETTER, "bad_url"
    yield aiohttp.NonHttpUrlClientError("ftp://docs/d.pdf"), DEAD_LETTER, "bad_url"
    yield aiohttp.InvalidUrlRedirectClientError("http://x:99999", "bad"), DEAD_LETTER, "bad_url"
    transient: list[Exception] = [
        aiohttp.ClientPayloadError("Response payload is not completed"),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientConnectionError("reset"),
        aiohttp.ClientOSError(104, "Connection reset by peer"),
        aiohttp.ClientConnectorError(_Key(), OSError(111, "refused")),  # type: ignore[arg-type]
        aiohttp.ServerTimeoutError("read timed out"),
        aiohttp.ConnectionTimeoutError("connect timed out"),
        aiohttp.SocketTimeoutError("socket timed out"),
        aiohttp.ClientResponseError(_request_info(), (), status=500),
        aiohttp.ContentTypeError(_request_info(), ()),
        aiohttp.TooManyRedirects(_request_info(), ()),
        aiohttp.ServerFingerprintMismatch(b"a", b"b", "docs.lsc.example", 443),
        aiohttp.ClientError("anything else"),
        asyncio.TimeoutError(),  # noqa: UP041 - the name aiohttp's callers still catch
        TimeoutError("deadline"),
    ]
    for error in transient:
        yield error, RETRY, "network"


KAFKA_ERRORS: list[KafkaError] = [
    KafkaTimeoutError("batch expired"),
    KafkaConnectionError("no broker"),
    NotLeaderForPartitionError(),
    RequestTimedOutError(),
    NodeNotReadyError(),
    ProducerClosed(),
    TopicAuthorizationFailedError(),
    KafkaError("anything else"),
]

RELAY_ERRORS: list[tuple[RelayError, Verdict]] = [
    (ConfigError("bad setting"), Verdict(FATAL, "config_error")),
    (KafkaConnectError("refused credentials"), Verdict(FATAL, "kafka_unreachable")),
    (KafkaUnavailableError("silent for 300 s"), Verdict(FATAL, "kafka_unavailable")),
    (StateDecodeError("corrupt record"), Verdict(FATAL, "state_unreadable")),
    (
        PartnerRetriableError("503", status=503),
        Verdict(RETRY, "partner_unavailable", from_partner=True),
    ),
    (
        PartnerRetriableError("429", status=429, retry_after=2.0),
        Verdict(RETRY, "partner_unavailable", from_partner=True),
    ),
    (PartnerParkedError("401", status=401), Verdict(PARK, "partner_refused", from_partner=True)),
    (PartnerParkedError("no API key"), Verdict(PARK, "partner_refused", from_partner=True)),
    (
        PartnerRejectedError("422", status=422),
        Verdict(DEAD_LETTER, "partner_rejected", from_partner=True),
    ),
    (PartnerError("other", status=418), Verdict(PARK, "partner_refused", from_partner=True)),
    # An id from the view, a command or the routing file that could leave the API's paths.
    (RemoteIdError("delete: the document id '../x'"), Verdict(PARK, "bad_remote_id")),
    (ContentUnavailableError("503", reason="unavailable"), Verdict(RETRY, "content_unavailable")),
    (ContentUnavailableError("slow", reason="timeout"), Verdict(RETRY, "content_unavailable")),
    (ContentError("port 70000", reason="bad_url"), Verdict(DEAD_LETTER, "bad_url")),
    (ContentError("gzip", reason="content_encoding"), Verdict(DEAD_LETTER, "content_rejected")),
    (ContentError("sha", reason="sha256_mismatch"), Verdict(DEAD_LETTER, "content_rejected")),
    (ContentError("404", reason="not_found"), Verdict(DEAD_LETTER, "content_rejected")),
    (LocalKafkaError("the local broker did not start"), Verdict(FATAL, "infrastructure")),
]


def _subclasses(cls: type[RelayError]) -> Iterator[type[RelayError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _orjson_error() -> Exception:
    try:
        orjson.loads(b"<html>502 Bad Gateway</html>")
    except orjson.JSONDecodeError as error:
        return error
    raise AssertionError("orjson accepted HTML")


@pytest.mark.parametrize(
    ("error", "disposition", "reason"),
    list(_aiohttp_errors()),
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else None,
)
def test_aiohttp_errors_retry_or_dead_letter_a_bad_url_and_never_blame_the_partner(
    error: Exception, disposition: Disposition, reason: str
) -> None:
    verdict = classify(error)
    assert (verdict.disposition, verdict.reason) == (disposition, reason)
    # The partner client wraps its own errors; a raw one came from elsewhere (the store).
    assert not verdict.from_partner
    assert verdict.expected


@pytest.mark.parametrize("error", KAFKA_ERRORS, ids=lambda e: type(e).__name__)
def test_kafka_errors_of_a_state_or_dead_letter_write_stop_the_relay(error: KafkaError) -> None:
    # aiokafka's producer has already retried within its delivery timeout when this comes back.
    for scope in Scope:
        assert classify(error, scope) == Verdict(FATAL, "kafka_unavailable")


@pytest.mark.parametrize(("error", "verdict"), RELAY_ERRORS, ids=lambda v: type(v).__name__)
def test_relay_errors_map_to_their_nature(error: RelayError, verdict: Verdict) -> None:
    assert classify(error, Scope.DOCUMENT) == verdict


def test_every_relay_error_class_has_a_foreseen_verdict() -> None:
    covered = {type(error) for error, _ in RELAY_ERRORS}
    missing = [cls.__name__ for cls in _subclasses(RelayError) if cls not in covered]
    assert missing == [], "add the new error class to RELAY_ERRORS and to classify()"


@pytest.mark.parametrize(
    "error",
    [ValueError("Port out of range 0-65535"), KeyError("id"), TypeError("None"), _orjson_error()],
    ids=lambda e: type(e).__name__,
)
def test_an_unforeseen_error_parks_the_document_and_dead_letters_a_record(
    error: Exception,
) -> None:
    name = type(error).__name__
    assert classify(error, Scope.DOCUMENT) == Verdict(PARK, f"unexpected:{name}", expected=False)
    assert classify(error, Scope.RELAY) == Verdict(PARK, f"unexpected:{name}", expected=False)
    assert classify(error, Scope.RECORD) == Verdict(DEAD_LETTER, "unexpected_error", expected=False)


@pytest.mark.parametrize(
    "error",
    [
        PartnerRejectedError("422", status=422),
        ContentError("sha", reason="sha256_mismatch"),
        ContentError("port", reason="bad_url"),
        aiohttp.InvalidURL("http://x:70000"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_work_without_an_input_record_parks_what_would_be_dead_lettered(error: Exception) -> None:
    # A refused withdrawal, or a parked document sent again, has no record of its own to set
    # aside: it stays parked with the refusal.
    document, relay = classify(error, Scope.DOCUMENT), classify(error, Scope.RELAY)
    assert document.disposition is DEAD_LETTER
    assert relay.disposition is PARK
    assert relay.reason == document.reason


@pytest.mark.parametrize(
    "error",
    [
        PartnerRetriableError("503", status=503),
        PartnerParkedError("401", status=401),
        ContentUnavailableError("503", reason="unavailable"),
        aiohttp.ServerDisconnectedError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_planning_a_record_never_retries_or_parks(error: Exception) -> None:
    assert classify(error, Scope.RECORD) == Verdict(DEAD_LETTER, "unexpected_error", expected=False)


def test_every_dead_letter_reason_the_taxonomy_gives_is_in_the_schema() -> None:
    errors: list[Exception] = [e for e, _, _ in _aiohttp_errors()]
    errors += [e for e, _ in RELAY_ERRORS] + [ValueError("x")]
    reasons = {
        verdict.reason
        for error in errors
        for scope in Scope
        if (verdict := classify(error, scope)).disposition is DEAD_LETTER
    }
    assert reasons <= DEAD_LETTER_REASONS
