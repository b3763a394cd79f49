"""What ChouetteCopro's answers mean: a resource, a refusal of the relay's tree, a wait.

A resource object becomes a ``RemoteDocument``; an answer outside the contract's success
becomes the error that says what the relay does next: retried (an unknown outcome), parked
(401, 403, anything the contract does not name) or rejected (400, 409, 413, 422). The partner's
own words are kept, cut and not yet redacted (the client redacts them), for the error message.
Resource ids are those of the contract's form only (``REMOTE_ID_PATTERN``), the one form the
client puts into a URL.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from consumer.errors import (
    PartnerError,
    PartnerParkedError,
    PartnerRejectedError,
    PartnerRetriableError,
)

MAX_DETAIL = 500

REMOTE_ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""The contract's ``Id`` (``schemas/chouettecopro.openapi.yaml``): one URL path segment that is
never a dot segment and holds no ``/``, no query, no fragment and no escape."""

_REMOTE_ID = re.compile(REMOTE_ID_PATTERN)


def is_remote_id(value: object) -> bool:
    """Whether ``value`` is a ChouetteCopro id of the contract's form (no trailing newline)."""
    return isinstance(value, str) and _REMOTE_ID.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class RemoteDocument:
    """A document as ChouetteCopro knows it."""

    remote_id: str
    reference: str | None
    sha256: str | None


def refuse(message: str, status: int, operation: str, not_found: type[PartnerError]) -> None:
    if 200 <= status < 300 and operation != "find_by_reference":
        # A write answered with another success than the contract's (say, 200 and an error
        # body): whether it happened is unknown, and the retry looks it up by reference.
        raise PartnerRetriableError(f"{message} (outcome unknown)", status=status)
    if status in (401, 403):
        raise PartnerParkedError(message, status=status)
    if status == 404:
        raise not_found(message, status=status)
    if status in (400, 409, 413, 422):
        raise PartnerRejectedError(message, status=status)
    # Anything else (405, 415, an unexpected 2xx...) means the contract changed: an operator
    # must look before more documents are sent.
    raise PartnerParkedError(f"{message} (not in the contract)", status=status)


def remote_document(body: Any, *, operation: str) -> RemoteDocument:
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        # The partner acted but the answer is unreadable: the outcome is unknown, and the
        # scheduler's retry reconciles it by reference before sending again.
        raise PartnerRetriableError(f"{operation}: the answer has no resource object")
    return read_resource(data, operation=operation)


def read_resource(data: Mapping[str, Any], *, operation: str) -> RemoteDocument:
    remote_id = data.get("id")
    if not isinstance(remote_id, str) or not remote_id:
        raise PartnerRetriableError(f"{operation}: the resource object has no id")
    if not is_remote_id(remote_id):
        # The partner assigns ids, and the relay would later put this one into a URL: an id
        # that could leave the documents' paths is never recorded, and an operator must look.
        raise PartnerParkedError(
            f"{operation}: the resource id {remote_id[:80]!a} is not of the contract's form "
            "(not in the contract)"
        )
    attributes = data.get("attributes")
    sha256 = attributes.get("sha256") if isinstance(attributes, dict) else None
    return RemoteDocument(
        remote_id=remote_id,
        reference=reference_of(data),
        sha256=sha256 if isinstance(sha256, str) else None,
    )


def reference_of(data: Mapping[str, Any]) -> str | None:
    attributes = data.get("attributes")
    reference = attributes.get("reference") if isinstance(attributes, dict) else None
    return reference if isinstance(reference, str) else None


def parse_json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def answer_message(operation: str, status: int, body: Any) -> str:
    """``upload: ChouetteCopro answered 422: sha256_mismatch: ... (source)``, not yet redacted."""
    parts = [f"{operation}: ChouetteCopro answered {status}"]
    errors = body.get("errors") if isinstance(body, dict) else None
    if isinstance(errors, list):
        for error in errors[:3]:
            if not isinstance(error, dict):
                continue
            text = ": ".join(
                str(error[field]) for field in ("code", "title", "detail") if error.get(field)
            )
            source = error.get("source")
            if isinstance(source, dict) and source:
                text += " (" + ", ".join(f"{k}={v}" for k, v in source.items()) + ")"
            parts.append(text[: MAX_DETAIL * 4])
    return ": ".join(parts)


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from ``Retry-After``: delay-seconds or an HTTP-date; None when absent or garbage."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())
