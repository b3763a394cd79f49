"""The audit's comparison and repair, without a partner: each finding, and findings gone stale."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib

import msgspec

from consumer.core.audit import Resend, compare, keep_newest, plan_repair, to_resend
from consumer.core.commands import Finding, FindingKind
from consumer.core.events import Document, DocumentCreated, ManifestSnapshot, Module, as_json
from consumer.core.planning.plan import Delete, Lane, Upload
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
    copies = {
        "gone": [RemoteDocument("r9", "gone", sha("gone"))],
        "edited": [RemoteDocument("r3", "edited", sha("x"))],
        "moved": [RemoteDocument("r6", "moved", sha("moved"))],
        "new": [RemoteDocument("r7", "new", sha("new"))],
    }

    plan = plan_repair(view, AGENCY, BUILDING, "c-1", findings, copies=copies)

    assert plan.records[0] == Tombstone(DocKey(AGENCY, BUILDING, "gone"))
    assert plan.records[1] == dataclasses.replace(published("edited", "r3"), sha256=sha("x"))
    assert len(plan.records) == 2
    [delete] = plan.operations
    assert isinstance(delete, Delete)
    assert (delete.remote_id, delete.condominium_id) == ("r9", "c-1")
    assert delete.key.document_id == "~copy:r9"  # never the document's own record


def lsc_document(document_id: str, version: str = "") -> Document:
    return msgspec.convert(
        {
            "id": document_id,
            "module": "ag",
            "category": "PV",
            "title": f"{document_id} {version}",
            "document_date": "2025-01-01",
            "audience": "building",
            "content": {
                "media_type": "application/pdf",
                "size_bytes": 100,
                "sha256": sha(document_id + version),
                "url": f"https://documents.lsc.example/{document_id}.pdf",
            },
        },
        type=Document,
    )


def at(hour: int) -> dt.datetime:
    return dt.datetime(2025, 1, 1, hour, tzinfo=dt.UTC)


def created(document: Document, hour: int, building: str = BUILDING) -> DocumentCreated:
    return msgspec.convert(
        {
            "schema_version": 1,
            "event_type": "document-created",
            "event_id": "8a1c2b4e-1111-4c2b-9a1c-0123456789ab",
            "occurred_at": at(hour).isoformat(),
            "agency_id": AGENCY,
            "building_id": building,
            "document": as_json(document),
        },
        type=DocumentCreated,
    )


def manifest(documents: list[Document], hour: int) -> ManifestSnapshot:
    return msgspec.convert(
        {
            "schema_version": 1,
            "event_type": "manifest-snapshot",
            "snapshot_id": "8a1c2b4e-2222-4c2b-9a1c-0123456789ab",
            "taken_at": at(hour).isoformat(),
            "agency_id": AGENCY,
            "building_id": BUILDING,
            "modules": ["ag"],
            "part": 1,
            "parts": 1,
            "item_count": len(documents),
            "items": [as_json(d) for d in documents],
        },
        type=ManifestSnapshot,
    )


def test_a_repair_sends_again_what_the_input_still_describes_and_forgets_only_the_rest() -> None:
    view = PublishedView()
    for record in (published("gone", "r2"), published("edited", "r3"), published("lost", "r4")):
        view.apply(record)
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
        # beyond the input's retention: nothing to send it again from
        Finding(
            kind=FindingKind.MISSING, document_id="lost", remote_id="r4", view_sha256=sha("lost")
        ),
    ]
    resend = {
        "gone": Resend(lsc_document("gone"), at(1), from_manifest=False),
        "edited": Resend(lsc_document("edited"), at(1), from_manifest=True),
    }

    copies = {
        "gone": [],
        "edited": [RemoteDocument("r3", "edited", sha("x"))],
        "lost": [],
    }

    plan = plan_repair(view, AGENCY, BUILDING, "c-1", findings, copies=copies, resend=resend)

    again, update = plan.operations
    assert isinstance(again, Upload)
    assert isinstance(update, Upload)
    assert (again.key.document_id, again.remote_id, again.lane) == ("gone", None, Lane.BACKFILL)
    assert again.document == lsc_document("gone")
    # The update replaces the partner's file: what the partner holds is its base, so the
    # executor does not skip it as already sent.
    assert (update.key.document_id, update.remote_id) == ("edited", "r3")
    assert update.previous is not None
    assert update.previous.sha256 == sha("x")
    assert plan.records == (Tombstone(DocKey(AGENCY, BUILDING, "lost")),)


def test_a_repair_reads_again_only_what_the_partner_bears_out() -> None:
    findings = [
        Finding(kind=FindingKind.MISSING, document_id="a", remote_id="r1", view_sha256="s"),
        Finding(kind=FindingKind.CHANGED, document_id="b", remote_id="r2", view_sha256="s"),
        Finding(kind=FindingKind.UNEXPECTED, document_id="c", remote_id="r3"),
        Finding(kind=FindingKind.MISSING, document_id="d", remote_id="r4", view_sha256="s"),
        Finding(kind=FindingKind.CHANGED, document_id="e", remote_id="r5", view_sha256="s"),
        Finding(kind=FindingKind.MISSING, document_id="f", remote_id="r6", view_sha256="s"),
    ]
    copies = {
        "a": [],
        "b": [RemoteDocument("r2", "b", "other")],
        "c": [RemoteDocument("r3", "c", "s")],
        "d": [RemoteDocument("r4", "d", "s")],  # not missing: the partner holds it
        "e": [RemoteDocument("r5", "e", "s")],  # not changed: the view's file
    }  # "f" could not be looked up

    assert to_resend(findings, copies) == {"a", "b"}


def test_a_forged_repair_withdraws_nothing_the_partner_does_not_show_as_a_stray_copy() -> None:
    view = PublishedView()
    view.apply(published("ours", "r1"))
    findings = [
        # a document made by hand, named as a copy of the relay's
        Finding(kind=FindingKind.UNEXPECTED, document_id="ours", remote_id="hand-1"),
        Finding(kind=FindingKind.UNEXPECTED, document_id="not-ours", remote_id="hand-1"),
        # the relay's own copy, under a reference the view does not know
        Finding(kind=FindingKind.UNEXPECTED, document_id="unknown", remote_id="r1"),
        # the relay's own copy, named missing: sending it again would make a second one
        Finding(
            kind=FindingKind.MISSING, document_id="ours", remote_id="r1", view_sha256=sha("ours")
        ),
        # a reference that could not be looked up
        Finding(kind=FindingKind.UNEXPECTED, document_id="unasked", remote_id="r8"),
    ]
    copies = {
        "ours": [RemoteDocument("r1", "ours", sha("ours"))],
        "not-ours": [],
        "unknown": [],
    }
    resend = {"ours": Resend(lsc_document("ours"), at(1), from_manifest=False)}

    plan = plan_repair(view, AGENCY, BUILDING, "c-1", findings, copies=copies, resend=resend)

    assert (plan.operations, plan.records) == ((), ())


def test_the_newest_description_of_a_wanted_document_of_the_building_is_kept() -> None:
    wanted = frozenset({"a", "b"})
    found: dict[str, Resend] = {}
    events: list[DocumentCreated | ManifestSnapshot] = [
        created(lsc_document("a", "v1"), hour=1),
        manifest([lsc_document("a", "v2"), lsc_document("b", "v1"), lsc_document("c")], hour=2),
        created(lsc_document("b", "v2"), hour=2),  # same time as the manifest: the manifest wins
        created(lsc_document("a", "other"), hour=5, building="bat-2"),
        created(lsc_document("a", "v3"), hour=3),
    ]
    for event in events:
        keep_newest(found, event, (AGENCY, BUILDING), wanted)

    assert {k: (v.document, v.seen_at) for k, v in found.items()} == {
        "a": (lsc_document("a", "v3"), at(3)),
        "b": (lsc_document("b", "v1"), at(2)),
    }
