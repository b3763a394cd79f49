"""The compact binary form of a document record (``schemas/state-record.v2.schema.json``).

Document records without a full document are written this way (about 70 bytes: raw sha256,
times as integers, codes, then the ids), and the published view stores the very same bytes, so
that restoring a record is checking it and keeping it. Parked records, and the few that owe
late-copy checks, keep the JSON form.
"""

from __future__ import annotations

import datetime as dt
import struct

from consumer.core.events import Module
from consumer.core.state import EPOCH, DocKey, DocStatus, DocumentRecord, to_epoch_us

COMPACT_FORM = 2
"""First byte of a compact document record; a JSON record starts with ``{``."""
# form, sha256, seen_at (µs since the epoch), size, document date (ordinal), status, module; then
# remote_id, condominium_id and held_by, each UTF-8 ended by a NUL byte, empty when absent.
COMPACT_HEAD = struct.Struct("<B32sqQIBB")
COMPACT_SEEN_AT = struct.Struct("<q")
COMPACT_SHA_AT = 1
COMPACT_SEEN_AT_AT = 33
COMPACT_STATUS_AT = 53
COMPACT_MODULE_AT = 54
COMPACT_FIELDS = struct.Struct("<B32xq8xIBB")
"""The fixed fields that can be out of range: what checking a compact record reads."""
# The codes are part of the format: a new status or module is appended, never inserted. Parked
# records carry their full document and keep the JSON form.
COMPACT_STATUSES = (
    DocStatus.PUBLISHED,
    DocStatus.BASELINE,
    DocStatus.UPLOADING,
    DocStatus.DELETE_HELD,
    DocStatus.FILTERED,
)
COMPACT_MODULES = (
    Module.AG,
    Module.CONTRATS,
    Module.CARNET_ENTRETIEN,
    Module.DIAGNOSTICS,
    Module.ASSURANCES,
    Module.REGLEMENT,
    Module.COMPTES,
    Module.GED,
)
COMPACT_STATUS_CODES = {status: code for code, status in enumerate(COMPACT_STATUSES)}
COMPACT_MODULE_CODES = {module: code for code, module in enumerate(COMPACT_MODULES)}
COMPACT_MIN_US = to_epoch_us(dt.datetime.min.replace(tzinfo=dt.UTC))
COMPACT_MAX_US = to_epoch_us(dt.datetime.max.replace(tzinfo=dt.UTC))
COMPACT_MAX_ORDINAL = dt.date.max.toordinal()


def pack_compact(
    sha256: str,
    *,
    seen_at_us: int,
    size_bytes: int,
    document_date: int,
    status: int,
    module: int,
    strings: tuple[str | None, str | None, str | None],
) -> bytes | None:
    """The compact form of a document record from its parts, or None when it has none.

    ``strings`` are remote_id, condominium_id and held_by. Empty strings, NUL bytes and sizes
    beyond 64 bits have no compact form: such records keep the JSON form.
    """
    if len(sha256) != 64 or not 0 <= size_bytes < 2**64:
        return None
    tail = b""
    for text in strings:
        if text is not None:
            if not text or "\0" in text:
                return None
            tail += text.encode()
        tail += b"\0"
    try:
        raw_sha = bytes.fromhex(sha256)
    except ValueError:
        return None
    if raw_sha.hex() != sha256:
        return None  # upper-case hex would not come back as written
    head = (COMPACT_FORM, raw_sha, seen_at_us, size_bytes, document_date, status, module)
    return COMPACT_HEAD.pack(*head) + tail


# The record packed last and its form: the view and the changelog writer pack the same record one
# after the other, and a record is immutable (held here, its identity cannot be reused).
_last_packed: tuple[DocumentRecord | None, bytes | None] = (None, None)


def compact_document(record: DocumentRecord) -> bytes | None:
    """The compact form of ``record``, or None when it keeps the JSON form."""
    global _last_packed  # noqa: PLW0603 - a one-record memo of a pure function
    last, packed = _last_packed
    if record is last:
        return packed
    packed = _pack(record)
    _last_packed = (record, packed)
    return packed


def _pack(record: DocumentRecord) -> bytes | None:
    status = COMPACT_STATUS_CODES.get(record.status)
    if (
        status is None
        or record.document is not None
        or record.parked_reason is not None
        or record.late_copy_checks is not None
    ):
        return None
    return pack_compact(
        record.sha256,
        seen_at_us=to_epoch_us(record.seen_at),
        size_bytes=record.size_bytes,
        document_date=record.document_date.toordinal(),
        status=status,
        module=COMPACT_MODULE_CODES[record.module],
        strings=(record.remote_id, record.condominium_id, record.held_by),
    )


def compact_is_valid(value: bytes) -> bool:
    """Whether ``value`` is a well-formed compact document record (the key aside)."""
    if len(value) < COMPACT_HEAD.size + 3:
        return False
    form, seen_at, ordinal, status, module = COMPACT_FIELDS.unpack_from(value)
    tail = value[COMPACT_HEAD.size :]
    return (
        form == COMPACT_FORM
        and COMPACT_MIN_US <= seen_at <= COMPACT_MAX_US
        and 0 < ordinal <= COMPACT_MAX_ORDINAL
        and status < len(COMPACT_STATUSES)
        and module < len(COMPACT_MODULES)
        and tail.count(0) == 3
        and tail[-1] == 0
        and (tail.isascii() or is_utf8(tail))
    )


def unpack_compact(key: DocKey, value: bytes) -> DocumentRecord:
    """The document record of a valid compact ``value`` (see ``compact_is_valid``)."""
    _, sha, seen_at, size, ordinal, status, module = COMPACT_HEAD.unpack_from(value)
    remote_id, condominium_id, held_by, _ = value[COMPACT_HEAD.size :].decode().split("\0")
    # positional arguments, in DocumentRecord's field order: this runs for every view lookup
    return DocumentRecord(
        key,
        COMPACT_STATUSES[status],
        sha.hex(),
        COMPACT_MODULES[module],
        EPOCH + dt.timedelta(microseconds=seen_at),
        dt.date.fromordinal(ordinal),
        size,
        remote_id or None,
        condominium_id or None,
        held_by or None,
    )


def is_utf8(value: bytes) -> bool:
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True
