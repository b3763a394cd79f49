"""The audit's comparison and repair, without a partner: each finding, and findings gone stale."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib

from consumer.core.audit import compare, plan_repair
from consumer.core.commands import Finding, FindingKind
from consumer.core.events import Module
from consumer.core.planning.plan import Delete
from consumer.core.state import DocKey, DocStatus, DocumentRecord, Tombstone
from consumer.core.view import PublishedView
from consumer.partner.answers import RemoteDocument

AGENCY, BUILDING = "agence-a", "bat-1"


def sha(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


def published(
    document_id: str, remote_id: str, status: DocStatus = DocStatus.PUBLISHED
) -> DocumentRecord:
    return DocumentRecord(
        key=DocKey(AGENCY, BUILDING, document_id),
        status=status,
        sha256=sha(document_id),
        module=Module.AG,
        seen_at=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
        document_date=dt.date(2025, 1, 1),
        size_bytes=100,
        remote_id=remote_id,
        condominium_id="c-1",
    )


def test_missing_unexpected_and_changed_documents_are_found_and_hand_made_ones_ignored() -> None:
    records = [published("kept", "r1"), published("gone", "r2"), published("edited", "r3")]
    remote = [
        RemoteDocument("r1", "kept", sha("kept")),
        RemoteDocument("r3", "edited", sha("someone else's file")),
        RemoteDocument("r4", "kept", sha("kept")),  # a duplicate
        RemoteDocument("r5", None, None),  # made by hand
    ]

    found = {(b, f.kind, f.document_id, f.remote_id) for b, f in compare(records, remote)}

    assert found == {
        (BUILDING, FindingKind.MISSING, "gone", "r2"),
        (BUILDING, FindingKind.CHANGED, "edited", "r3"),
        (BUILDING, FindingKind.UNEXPECTED, "kept", "r4"),
    }


def test_a_repair_acts_only_on_findings_still_true_in_the_view() -> None:
    view = PublishedView()
    for record in (published("gone", "r2"), published("edited", "r3"), published("moved", "r6")):
        view.apply(record)
    view.apply(published("new", "r7", DocStatus.UPLOADING))
    findings = [
        Finding(
            kind=FindingKind.MISSING, document_id="gone", remote_id="r2", view_sha256=sha("gone")
        ),
        Finding(
            kind=FindingKind.CHANGED,
            document_id="edited",
            remote_id="r3",
            view_sha256=sha("edited"),
            partner_sha256=sha("x"),
        ),
        # settled since the audit: the view now says another remote id
        Finding(
            kind=FindingKind.MISSING, document_id="moved", remote_id="r0", view_sha256=sha("moved")
        ),
        Finding(kind=FindingKind.UNEXPECTED, document_id="new", remote_id="r7"),  # uploading
        Finding(kind=FindingKind.UNEXPECTED, document_id="gone", remote_id="r9"),
    ]

    plan = plan_repair(view, AGENCY, BUILDING, "c-1", findings)

    assert plan.records[0] == Tombstone(DocKey(AGENCY, BUILDING, "gone"))
    assert plan.records[1] == dataclasses.replace(published("edited", "r3"), sha256=sha("x"))
    assert len(plan.records) == 2
    [delete] = plan.operations
    assert isinstance(delete, Delete)
    assert (delete.remote_id, delete.condominium_id) == ("r9", "c-1")
    assert delete.key.document_id == "~copy:r9"  # never the document's own record
