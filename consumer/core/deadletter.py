"""The dead-letter envelope: a record the relay gave up on, with its original bytes and the reason.

``build_dead_letter`` only builds the Kafka key, value and headers (``schemas/dead-letter.v1``);
producing them is the caller's business. The envelope keeps key, value and headers as base64, so
any record, UTF-8 or not, null or not, can be replayed byte for byte. ``DeadLetterLedger`` keeps
which source records have a dead letter already, so that a record read again is not written twice.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Final

import orjson

from consumer.core.decoding import PoisonReason

DEAD_LETTER_SCHEMA_VERSION: Final = 1
REASON_HEADER: Final = "dead-letter-reason"
MAX_DETAIL_CHARS: Final = 2000


class ProcessingReason(StrEnum):
    """Why a record that decoded fine was still dead-lettered later on."""

    PARTNER_REJECTED = "partner_rejected"
    """ChouetteCopro refused the document for good (422)."""
    CONTENT_REJECTED = "content_rejected"
    """The content cannot be used: checksum or size differ, host not allowed, too large."""
    MANIFEST_TOO_LARGE = "manifest_too_large"
    """A snapshot of more items than ``MANIFEST__MAX_PENDING_ITEMS``: it can never be assembled."""
    INCONSISTENT_PARTS = "inconsistent_parts"
    """A part contradicts parts of its snapshot already read (header, or same number with other
    items): which one LSC meant is unknown, so the snapshot is dropped."""
    BAD_URL = "bad_url"
    """The content URL is one the HTTP stack cannot parse (a port above 65535, a bad IPv6)."""
    UNEXPECTED_ERROR = "unexpected_error"
    """Handling the record failed in a way no edge foresaw (a bug): set aside, traceback logged."""


DEAD_LETTER_REASONS: Final[frozenset[str]] = frozenset({*PoisonReason, *ProcessingReason})

SourceId = tuple[str, int, int]
"""Where a dead-lettered record came from: its topic, partition and offset."""

NO_REPLAY_FIXES: Final[frozenset[str]] = frozenset(
    {
        PoisonReason.NULL_VALUE,
        PoisonReason.NOT_UTF8,
        PoisonReason.NOT_JSON,
        PoisonReason.NOT_AN_OBJECT,
        PoisonReason.SCHEMA_VIOLATION,
        PoisonReason.KEY_MISSING,
        PoisonReason.KEY_MISMATCH,
        PoisonReason.HEADER_MISMATCH,
        PoisonReason.WRONG_TOPIC,
        PoisonReason.PART_OUT_OF_RANGE,
        PoisonReason.ITEM_COUNT_MISMATCH,
        PoisonReason.ITEM_OUT_OF_SCOPE,
        PoisonReason.DUPLICATE_ITEM_ID,
    }
)
"""Reasons in the record's own bytes: the same bytes sent again are refused again, whatever the
relay's configuration, version or clock. (An oversized record, an unknown schema version or a
date from the future may pass after a setting change, an upgrade or some time.)"""


def build_dead_letter(
    *,
    source_topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int | None,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]],
    reason: str,
    detail: str,
    failed_at: dt.datetime,
    relay_version: str,
) -> tuple[bytes | None, bytes, list[tuple[str, bytes | None]]]:
    """Return the dead-letter record's key (the original one), JSON value and headers.

    ``reason`` must be one of ``DEAD_LETTER_REASONS`` and ``failed_at`` timezone-aware: anything
    else is a programming error and raises ``ValueError``. A negative ``timestamp_ms`` (Kafka's
    "no timestamp") is written as null; ``detail`` is cut to ``MAX_DETAIL_CHARS``.
    """
    if reason not in DEAD_LETTER_REASONS:
        raise ValueError(f"not a dead-letter reason: {reason!r}")
    if failed_at.utcoffset() is None:
        raise ValueError("failed_at must be timezone-aware")
    envelope = {
        "schema_version": DEAD_LETTER_SCHEMA_VERSION,
        "reason": reason,
        "detail": detail[:MAX_DETAIL_CHARS],
        "failed_at": _rfc3339_utc(failed_at),
        "relay_version": relay_version,
        "source": {
            "topic": source_topic,
            "partition": partition,
            "offset": offset,
            "timestamp_ms": timestamp_ms
            if timestamp_ms is not None and timestamp_ms >= 0
            else None,
        },
        "record": {
            "key_base64": _b64(key),
            "value_base64": _b64(value),
            "headers": [{"key": name, "value_base64": _b64(raw)} for name, raw in headers],
        },
    }
    dead_letter_headers: list[tuple[str, bytes | None]] = [(REASON_HEADER, reason.encode())]
    dead_letter_headers.extend(headers)
    return key, orjson.dumps(envelope), dead_letter_headers


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode("ascii")


def _rfc3339_utc(moment: dt.datetime) -> str:
    utc = moment.astimezone(dt.UTC)
    return utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dead_letter_source(value: bytes | None) -> SourceId | None:
    """The source record a dead letter's value names, or None when the value is not one."""
    if value is None:
        return None
    try:
        source = orjson.loads(value)["source"]
        topic, partition, offset = source["topic"], source["partition"], source["offset"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if not (isinstance(topic, str) and type(partition) is int and type(offset) is int):
        return None
    return topic, partition, offset


class DeadLetterLedger:
    """The source records known to have a dead letter, and how much of the topic was read.

    The dead-letter topic is read in stretches of offsets: for each of its partitions, one
    contiguous range ``[first, end)`` has been read, reaching back to the records written since
    ``since_ms`` (or since the beginning). A later look reads only what lies outside that range:
    the records written since (the tail), and older ones when it must reach further back.
    Past ``max_sources`` known records the ledger forgets everything at the next ``trim``: memory
    stays bounded, and the next look reads its stretches again.
    """

    def __init__(self, *, max_sources: int = 100_000) -> None:
        self._max_sources = max_sources
        self._read: dict[int, tuple[int, int]] = {}
        self._since_ms: int | None = None
        self._from_beginning = False
        self._written: set[SourceId] = set()

    def trim(self) -> None:
        """Forget what was read once more records are known than the bound (between looks)."""
        if len(self._written) > self._max_sources:
            self._read.clear()
            self._since_ms = None
            self._from_beginning = False
            self._written.clear()

    def __contains__(self, source: SourceId) -> bool:
        return source in self._written

    def note(self, source: SourceId | None) -> None:
        """A dead letter for ``source`` is in the topic (written, or read there)."""
        if source is not None:
            self._written.add(source)

    def reaches_back_to(self, since_ms: int | None) -> bool:
        """Whether what was read covers every dead letter written since ``since_ms`` (None: ever),
        up to the ends last read."""
        if self._from_beginning:
            return True
        return since_ms is not None and self._since_ms is not None and since_ms >= self._since_ms

    def unread(
        self, starts: Mapping[int, int] | None, ends: Mapping[int, int]
    ) -> list[tuple[int, int, int]]:
        """``(partition, first, end)`` stretches still to read to cover ``starts`` (the first
        offset to reach back to in each partition; None: only the tail) up to ``ends``; a
        partition never read before comes with its stretch even when empty."""
        stretches: list[tuple[int, int, int]] = []
        for partition, end in sorted(ends.items()):
            known = self._read.get(partition)
            start = (starts or {}).get(partition, 0 if known is None else known[0])
            if known is None:
                # Even empty: marked read, a partition with nothing new is not read whole later.
                stretches.append((partition, min(start, end), end))
                continue
            first, last = known
            if start < first:
                stretches.append((partition, start, first))
            if last < end:
                stretches.append((partition, last, end))
        return stretches

    def mark_read(self, partition: int, first: int, end: int, sources: Iterable[SourceId]) -> None:
        """The stretch ``[first, end)`` of ``partition`` was read, holding dead letters for
        ``sources``. A stretch adjoins what was read before (as ``unread`` gives them)."""
        self._written.update(sources)
        known = self._read.get(partition)
        self._read[partition] = (
            (first, end)
            if known is None
            else (
                min(first, known[0]),
                max(end, known[1]),
            )
        )

    def reached_back_to(self, since_ms: int | None) -> None:
        """Every partition has been read back to the records written since ``since_ms``."""
        if since_ms is None:
            self._from_beginning = True
        elif self._since_ms is None or since_ms < self._since_ms:
            self._since_ms = since_ms
