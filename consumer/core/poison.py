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

from pydantic import ValidationError
from pydantic_core import ErrorDetails


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
_URL_ERRORS: Final = frozenset({"string_pattern_mismatch", "string_too_long"})
_URL_RULE: Final = (
    "an http(s) URL with a host name or IPv4 address, a port from 1 to 65535, no user info,"
    " and only RFC 3986 characters with %HH escapes"
)


def schema_poison(error: ValidationError) -> Poison:
    """A schema violation; ``bad_url`` when a URL the relay could never fetch is all that is wrong.

    A manifest part with one such item is refused whole: a list that cannot be read in full is no
    exhaustive list, and acting on the rest would withdraw that item's published version.
    """
    problems = error.errors(include_url=False, include_context=False)
    if all(_is_url_problem(problem) for problem in problems):
        first = problems[0]
        url = first["input"]
        # user info may hold a password: it stays in the dead letter's bytes, not in logs
        shown = quote(_USER_INFO.sub("//***@", url)) if isinstance(url, str) else "?"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return Poison(
            PoisonReason.BAD_URL,
            f"{_path(first['loc'])}: {shown} cannot be fetched; the contract asks for {_URL_RULE}"
            f"{more}",
        )
    return Poison(PoisonReason.SCHEMA_VIOLATION, _describe(problems))


def _is_url_problem(problem: ErrorDetails) -> bool:
    return problem["loc"][-2:] == ("content", "url") and problem["type"] in _URL_ERRORS


def _describe(problems: list[ErrorDetails]) -> str:
    """Name the first failing field path, then what is wrong with it."""
    first = problems[0]
    # The URL pattern is far too long to quote; say what it asks for instead.
    message = f"should be {_URL_RULE}" if _is_url_problem(first) else first["msg"]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{_path(first['loc'])}: {message}{more}"


def _path(loc: tuple[int | str, ...]) -> str:
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    return path.lstrip(".") or "(value)"


def quote(text: str, limit: int = 120) -> str:
    """Quote untrusted text for a detail message, cut to a readable length."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
