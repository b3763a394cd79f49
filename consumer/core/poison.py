"""Why a record is poison, and how a schema violation is told: the reasons of the dead-letter
metric and the details an operator reads.

A reason is an interface (alerts and tests name them); the detail names the first failing field
and what the contract asks of it, without quoting secrets a URL's user info may hold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import msgspec

from consumer.core.events import FieldViolationError, UnfetchableUrlError


class PoisonReason(StrEnum):
    """Why a record cannot become an event; one label of the dead-letter metric."""

    NULL_VALUE = "null_value"
    OVERSIZED = "oversized"
    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    NOT_AN_OBJECT = "not_an_object"
    UNKNOWN_SCHEMA_VERSION = "unknown_schema_version"
    UNKNOWN_EVENT_TYPE = "unknown_event_type"
    WRONG_TOPIC = "wrong_topic"
    HEADER_MISMATCH = "header_mismatch"
    SCHEMA_VIOLATION = "schema_violation"
    KEY_MISSING = "key_missing"
    KEY_MISMATCH = "key_mismatch"
    PART_OUT_OF_RANGE = "part_out_of_range"
    ITEM_COUNT_MISMATCH = "item_count_mismatch"
    ITEM_OUT_OF_SCOPE = "item_out_of_scope"
    DUPLICATE_ITEM_ID = "duplicate_item_id"
    BAD_URL = "bad_url"
    TAKEN_AT_IN_FUTURE = "taken_at_in_future"
    OCCURRED_AT_IN_FUTURE = "occurred_at_in_future"


@dataclass(frozen=True, slots=True)
class Poison:
    """A record that is not a valid event: dead-letter it with this reason and detail."""

    reason: PoisonReason
    detail: str


_USER_INFO: Final = re.compile(r"//[^/?#@]*@")
_URL_RULE: Final = (
    "an http(s) URL with a host name or IPv4 address, a port from 1 to 65535, no user info,"
    " and only RFC 3986 characters with %HH escapes"
)
# msgspec's message, then where: "Expected `int`, got `str` - at `$.items[3].content.size_bytes`".
_LOCATED: Final = re.compile(r"(?P<message>.*) - at `\$(?P<path>.*)`", re.DOTALL)
_FIELD: Final = re.compile(
    r"Object (?P<problem>missing required|contains unknown) field `(?P<name>.*)`", re.DOTALL
)
_PATTERN: Final = "Expected `str` matching regex"
# What each pattern of the contract asks for, said instead of quoting the pattern.
_IDENTIFIER_RULE: Final = (
    "an identifier: a letter or digit, then up to 63 letters, digits, '_', '.' or '-'"
)
_PATTERN_RULES: Final = {
    "agency_id": _IDENTIFIER_RULE,
    "building_id": _IDENTIFIER_RULE,
    "event_id": "a UUID in its hyphenated form",
    "snapshot_id": "a UUID in its hyphenated form",
    "id": "a document id: a letter or digit, then up to 199 letters, digits, '_', '.', ':' or '-'",
    "sha256": "64 lower-case hexadecimal digits",
    "category": "text that is not only white space",
    "title": "text that is not only white space",
    "inline_base64": "standard base64 with padding",
    "occurred_at": "an RFC 3339 date-time with an offset, like 2024-05-06T07:08:09Z",
    "taken_at": "an RFC 3339 date-time with an offset, like 2024-05-06T07:08:09Z",
}
# JSON Schema's integers are msgspec's int or integral float; say integer, as the contract does.
_WORDING: Final = (
    ("`float` that's a multiple of 1.0", "an integer, not a fraction"),
    ("`int | float`", "`int`"),
)
_MAX_TEXT: Final = 200


def schema_poison(violation: msgspec.ValidationError) -> Poison:
    """The first schema violation msgspec met; ``bad_url`` when it is a URL the relay could never
    fetch.

    A manifest part with one such item is refused whole: a list that cannot be read in full is no
    exhaustive list, and acting on the rest would withdraw that item's published version.
    """
    where, message = _locate(violation)
    cause = violation.__cause__
    if isinstance(cause, UnfetchableUrlError):
        # user info may hold a password: it stays in the dead letter's bytes, not in logs
        shown = quote(_USER_INFO.sub("//***@", cause.url))
        return Poison(
            PoisonReason.BAD_URL,
            f"{where}: {shown} cannot be fetched; the contract asks for {_URL_RULE}",
        )
    return Poison(PoisonReason.SCHEMA_VIOLATION, f"{where}: {message}")


def _locate(violation: msgspec.ValidationError) -> tuple[str, str]:
    """The failing field's path (``items[3].content.sha256``) and what is wrong with it."""
    text = str(violation)
    located = _LOCATED.fullmatch(text)
    path, message = (located["path"], located["message"]) if located else ("", text)
    field = _FIELD.fullmatch(message)
    cause = violation.__cause__
    if field is not None:
        path = f"{path}.{field['name']}"
        missing = field["problem"] == "missing required"
        message = "required but missing" if missing else "not a field of the contract"
    elif isinstance(cause, FieldViolationError):
        path, message = f"{path}.{cause.field}", cause.message
    elif message.startswith(_PATTERN):
        name = path.rpartition(".")[2]
        message = f"Expected {_PATTERN_RULES.get(name, 'text of the pattern the contract gives')}"
    for said, meant in _WORDING:
        message = message.replace(said, meant)
    return _cut(path.lstrip(".") or "(value)"), _cut(message)


def _cut(text: str) -> str:
    # A field's name or a refused value quoted in the message may be as long as the record.
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "..."


def quote(text: str, limit: int = 120) -> str:
    """Quote untrusted text for a detail message, cut to a readable length."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
