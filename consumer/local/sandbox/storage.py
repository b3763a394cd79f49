"""What the sandbox stores: documents per condominium, their bytes on request, and creation counts.

Documents made through the API carry a reference; the ones a test makes "by hand" (as a user of
the app would) do not. Counting successful creations per reference is how a duplicate upload is
seen. Everything is in memory and gone when the sandbox stops, unless exported and restored.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class SandboxDocument:
    """A stored document. Hand-made ones have no reference and only a title."""

    id: str
    condominium_id: str
    title: str
    reference: str | None = None
    category: str | None = None
    document_date: str | None = None
    module: str | None = None
    audience: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    created_by_hand: bool = False


class Storage:
    """The stored documents in creation order; uploaded bytes only with ``keep_bytes``."""

    def __init__(self, *, keep_bytes: bool) -> None:
        self._keep_bytes = keep_bytes
        self._documents: dict[str, SandboxDocument] = {}
        self._bytes: dict[str, bytes] = {}
        self._creates: Counter[str] = Counter()
        self._next_id = 1

    def new_id(self) -> str:
        remote_id = f"doc-{self._next_id:06d}"
        self._next_id += 1
        return remote_id

    def store(
        self, remote_id: str, condominium_id: str, attributes: Mapping[str, Any], file: bytes
    ) -> SandboxDocument:
        document = SandboxDocument(
            id=remote_id,
            condominium_id=condominium_id,
            title=attributes["title"],
            reference=attributes["reference"],
            category=attributes["category"],
            document_date=str(attributes["document_date"]),
            module=attributes["module"],
            audience=attributes["audience"],
            sha256=attributes["sha256"],
            size_bytes=attributes["size_bytes"],
        )
        self._documents[remote_id] = document
        if self._keep_bytes:
            self._bytes[remote_id] = file
        return document

    def count_creation(self, reference: str) -> None:
        self._creates[reference] += 1

    def delete(self, remote_id: str) -> None:
        del self._documents[remote_id]
        self._bytes.pop(remote_id, None)

    # -- changes by hand, as a user of the app would make them ---------------------------------

    def seed_manual_document(self, condominium_id: str, title: str) -> str:
        document = SandboxDocument(
            id=self.new_id(), condominium_id=condominium_id, title=title, created_by_hand=True
        )
        self._documents[document.id] = document
        return document.id

    def replace_file_by_hand(self, remote_id: str, sha256: str) -> None:
        self._documents[remote_id] = dataclasses.replace(self._documents[remote_id], sha256=sha256)

    def delete_by_hand(self, remote_id: str) -> None:
        self._documents.pop(remote_id)

    def seed_copy(self, remote_id: str) -> str:
        copy = dataclasses.replace(self._documents[remote_id], id=self.new_id())
        self._documents[copy.id] = copy
        return copy.id

    # -- kept across runs (``make run KEEP=1``) --------------------------------------------------

    def export(self) -> dict[str, Any]:
        """The documents and counts, as JSON-ready data (bytes are never kept)."""
        return {
            "documents": [dataclasses.asdict(d) for d in self._documents.values()],
            "creates": dict(self._creates),
            "next_id": self._next_id,
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        """What ``export`` gave, replacing what is stored."""
        self._documents = {d["id"]: SandboxDocument(**d) for d in data["documents"]}
        self._creates = Counter(data["creates"])
        self._next_id = int(data["next_id"])

    # -- inspection ----------------------------------------------------------------------------

    def documents(self, condominium_id: str | None = None) -> list[SandboxDocument]:
        return [
            d
            for d in self._documents.values()
            if condominium_id is None or d.condominium_id == condominium_id
        ]

    def document(self, remote_id: str) -> SandboxDocument | None:
        return self._documents.get(remote_id)

    def content_of(self, remote_id: str) -> bytes | None:
        return self._bytes.get(remote_id)

    def create_count(self, reference: str) -> int:
        return self._creates[reference]

    def create_counts(self) -> dict[str, int]:
        return dict(self._creates)

    def duplicated_references(self) -> dict[str, int]:
        return {ref: n for ref, n in self._creates.items() if n > 1}

    def by_condominium(self) -> dict[str, list[dict[str, Any]]]:
        """Every document as a dict, grouped by condominium (sorted), in creation order."""
        return {
            cid: [dataclasses.asdict(d) for d in self.documents(cid)]
            for cid in sorted({d.condominium_id for d in self._documents.values()})
        }
