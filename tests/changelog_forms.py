"""The first form of a document record on the changelog, as the relay wrote it before the compact
form: JSON of schema version 1. Changelogs written then are never rewritten, so it is read forever.
"""

from __future__ import annotations

import datetime as dt

import orjson

from consumer.core.events import as_json
from consumer.core.state import DocumentRecord, StateRecord
from consumer.core.state_codec import encode_state


def first_form(record: DocumentRecord) -> bytes:
    """The JSON value of ``record`` in schema version 1."""
    document = None if record.document is None else as_json(record.document)
    return orjson.dumps(
        {
            "schema_version": 1,
            "kind": "document",
            "status": str(record.status),
            "sha256": record.sha256,
            "module": str(record.module),
            "seen_at": record.seen_at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z"),
            "document_date": record.document_date.isoformat(),
            "size_bytes": record.size_bytes,
            "remote_id": record.remote_id,
            "condominium_id": record.condominium_id,
            "held_by": record.held_by,
            "parked_reason": record.parked_reason,
            "document": document,
        }
    )


def encode_first_form(record: StateRecord) -> tuple[bytes, bytes | None]:
    """``encode_state`` as it was before the compact form."""
    if isinstance(record, DocumentRecord):
        return record.key.encode(), first_form(record)
    return encode_state(record)
