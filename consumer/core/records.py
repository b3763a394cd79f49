"""An input record as read from Kafka, bytes untouched.

Kept apart from any Kafka client so the pure core, the partner edge and the dead-letter sink can
all speak of it: the dead-letter envelope carries exactly what LSC sent (key, value, headers) with
its topic, partition and offset.
"""

from __future__ import annotations

from typing import NamedTuple


class SourceRecord(NamedTuple):
    """One record; a named tuple because ingest builds one per record read, and a tuple is
    built for a third of what a frozen dataclass costs."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
