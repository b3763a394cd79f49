"""Delta planning, rule by rule: what each event makes the relay send, record, hold or leave."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import uuid
from collections.abc import Iterable
from typing import Any

import msgspec
import pytest

from consumer.core.events import Document, DocumentCreated, Module, as_json
from consumer.core.guard import DeletionGuard
from consumer.core.manifest import CompleteManifest
from consumer.core.planning.actions import discard_held, release_held, retry_parked
from consumer.core.planning.documents import plan_document
from consumer.core.planning.first_publication import plan_first_publication, unapproved_modules
from consumer.core.planning.manifests import plan_manifest
from consumer.core.planning.plan import (
    Delete,
    Lane,
    Outcome,
    Plan,
    Upload,
    deleted_record,
    intent_record,
    published_record,
)
from consumer.core.routing import RoutingTable
from consumer.core.state import (
    AgencyRecord,
    BuildingRecord,
    DocKey,
    DocStatus,
    DocumentRecord,
    HeldManifest,
    HoldDecision,
    Tombstone,
)
from consumer.core.view import PublishedView

AGENCY, BUILDING, UNMAPPED = "agence-lyon", "bat-12", "bat-13"
T0 = dt.datetime(2024, 6, 1, 10, 0, tzinfo=dt.UTC)
GUARD = DeletionGuard(max_share=0.5, min_count=3)


def at(minutes: int) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def sha(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


def routing(first_publication: str = "history") -> RoutingTable:
    return RoutingTable.from_mapping(
        {
            "agencies": {
                AGENCY: {
                    "modules": ["ag", "contrats"],
                    "audiences": ["building", "council"],
                    "first_publication": first_publication,
                    "condominia": {BUILDING: "8841"},
                }
            }
        }
    )


def doc(
    document_id: str,
    version: str = "v1",
    *,
    module: str = "ag",
    audience: str = "building",
    date: str = "2024-05-01",
) -> Document:
    return msgspec.convert(
        {
            "id": document_id,
            "module": module,
            "category": "PV",
            "title": document_id,
            "document_date": date,
            "audience": audience,
            "content": {
                "media_type": "application/pdf",
                "size_bytes": 1000,
                "sha256": sha(f"{document_id}/{version}"),
                "url": f"https://documents.lsc.example/{document_id}.pdf",
            },
        },
        type=Document,
    )


def created(document: Document, when: dt.datetime, building: str = BUILDING) -> DocumentCreated:
    return msgspec.convert(
        {
            "schema_version": 1,
            "event_type": "document-created",
            "event_id": str(uuid.uuid4()),
            "occurred_at": when.isoformat(),
            "agency_id": AGENCY,
            "building_id": building,
            "document": as_json(document),
        },
        type=DocumentCreated,
    )


def manifest(
    when: dt.datetime,
    *items: Document,
    modules: Iterable[Module] = (Module.AG, Module.CONTRATS),
    building: str = BUILDING,
) -> CompleteManifest:
    return CompleteManifest(
        agency_id=AGENCY,
        building_id=building,
        snapshot_id=str(uuid.uuid4()),
        taken_at=when,
        modules=frozenset(modules),
        items=items,
        offsets=(1,),
    )


def key(document_id: str, building: str = BUILDING) -> DocKey:
    return DocKey(AGENCY, building, document_id)


def published(document: Document, seen_at: dt.datetime = T0, **changes: Any) -> DocumentRecord:
    fields: dict[str, Any] = {
        "key": key(document.id),
        "status": DocStatus.PUBLISHED,
        "sha256": document.content.sha256,
        "module": document.module,
        "seen_at": seen_at,
        "document_date": document.document_date,
        "size_bytes": document.content.size_bytes,
        "remote_id": f"r-{document.id}",
        "condominium_id": "8841",
    }
    return DocumentRecord(**(fields | changes))


def view_of(*records: Any) -> PublishedView:
    view = PublishedView()
    for record in records:
        view.apply(record)
    return view


def decided(when: dt.datetime, *modules: Module, building: str = BUILDING) -> BuildingRecord:
    return BuildingRecord(AGENCY, building, dict.fromkeys(modules, when), True)


def uploads(plan: Plan) -> dict[str, Upload]:
    return {op.key.document_id: op for op in plan.operations if isinstance(op, Upload)}


def deletes(plan: Plan) -> dict[str, Delete]:
    return {op.key.document_id: op for op in plan.operations if isinstance(op, Delete)}


def statuses(plan: Plan) -> dict[str, DocStatus]:
    return {r.key.document_id: r.status for r in plan.records if isinstance(r, DocumentRecord)}


def tombstones(plan: Plan) -> set[str]:
    return {
        r.key.document_id
        for r in plan.records
        if isinstance(r, Tombstone) and isinstance(r.key, DocKey)
    }


# -- document-created: the live lane ------------------------------------------------------------


def test_a_new_document_is_uploaded_in_the_live_lane() -> None:
    plan = plan_document(PublishedView(), routing(), created(doc("d1"), at(5)))
    assert plan.outcome is Outcome.UPLOAD
    assert uploads(plan) == {
        "d1": Upload(key("d1"), doc("d1"), "8841", Lane.LIVE, at(5), remote_id=None, previous=None)
    }
    assert plan.records == ()


def test_same_content_is_skipped_and_changed_content_updates_in_place() -> None:
    current = published(doc("d1"))
    view = view_of(current)
    assert plan_document(view, routing(), created(doc("d1"), at(5))) == Plan(Outcome.UNCHANGED)
    plan = plan_document(view, routing(), created(doc("d1", "v2"), at(5)))
    update = uploads(plan)["d1"]
    assert (update.remote_id, update.previous, update.condominium_id) == ("r-d1", current, "8841")


@pytest.mark.parametrize("status", [DocStatus.UPLOADING, DocStatus.BASELINE])
def test_same_content_already_uploading_or_baseline_is_skipped(status: DocStatus) -> None:
    view = view_of(published(doc("d1"), status=status, remote_id=None))
    assert plan_document(view, routing(), created(doc("d1"), at(5))).outcome is Outcome.UNCHANGED


def test_a_baseline_document_changed_after_cut_over_is_sent() -> None:
    view = view_of(published(doc("d1"), status=DocStatus.BASELINE, remote_id=None))
    plan = plan_document(view, routing(), created(doc("d1", "v2"), at(5)))
    assert uploads(plan)["d1"].remote_id is None


def test_an_event_a_newer_manifest_already_decided_is_superseded() -> None:
    view = view_of(decided(at(10), Module.AG))
    for when in (at(9), at(10)):
        plan = plan_document(view, routing(), created(doc("d1"), when))
        assert plan == Plan(Outcome.SUPERSEDED)  # listed: handled; absent: stays unpublished
    assert plan_document(view, routing(), created(doc("d1"), at(11))).outcome is Outcome.UPLOAD
    other_module = created(doc("d2", module="contrats"), at(9))
    assert plan_document(view, routing(), other_module).outcome is Outcome.UPLOAD


def test_an_event_older_than_the_version_recorded_is_stale() -> None:
    view = view_of(published(doc("d1", "v2"), seen_at=at(10)))
    assert plan_document(view, routing(), created(doc("d1"), at(5))) == Plan(Outcome.STALE)


@pytest.mark.parametrize("audience", ["individual", "owners"])
def test_a_version_whose_audience_is_not_forwarded_is_remembered_not_sent(audience: str) -> None:
    document = doc("d1", audience=audience)
    plan = plan_document(PublishedView(), routing(), created(document, at(5)))
    assert (plan.outcome, plan.operations) == (Outcome.FILTERED, ())
    # until a newer manifest: an older one read late must not bring back an earlier version
    assert statuses(plan) == {"d1": DocStatus.FILTERED}
    view = view_of(*plan.records)
    late = plan_manifest(view, routing(), manifest(at(2), doc("d1", "v0")), GUARD)
    assert uploads(late) == {}
    # A newer manifest listing it keeps the marker (forgetting it could be durable before
    # that manifest is, and a crash would then let the older one bring the version back);
    # a newer one that leaves it out forgets it.
    newer = plan_manifest(view, routing(), manifest(at(9), document), GUARD)
    assert (uploads(newer), statuses(newer), tombstones(newer)) == ({}, {}, set())
    assert tombstones(plan_manifest(view, routing(), manifest(at(9)), GUARD)) == {"d1"}


def test_documents_of_disabled_modules_or_agencies_not_served_leave_no_trace() -> None:
    other = RoutingTable.from_mapping(
        {"agencies": {"agence-nice": {"modules": ["ag"], "first_publication": "history"}}}
    )
    filtered = Plan(Outcome.FILTERED)
    assert plan_document(PublishedView(), other, created(doc("d1"), at(5))) == filtered
    comptes = created(doc("d1", module="comptes"), at(5))
    assert plan_document(PublishedView(), routing(), comptes) == filtered


def test_a_published_document_whose_new_version_routing_filters_is_withdrawn() -> None:
    view = view_of(published(doc("d1")))
    new_version = doc("d1", "v2", audience="individual")
    plan = plan_document(view, routing(), created(new_version, at(5)))
    assert plan.outcome is Outcome.FILTERED
    (withdraw,) = plan.operations
    assert isinstance(withdraw, Delete)
    assert (withdraw.key, withdraw.condominium_id, withdraw.remote_id) == (
        key("d1"),
        "8841",
        "r-d1",
    )
    after = deleted_record(withdraw)  # what stands for it once the partner acknowledged
    assert isinstance(after, DocumentRecord)
    assert (after.status, after.sha256, after.seen_at) == (
        DocStatus.FILTERED,
        new_version.content.sha256,
        at(5),
    )
    assert deleted_record(Delete(key("d2"), "8841", "r-d2")) == Tombstone(key("d2"))


def test_an_unmapped_building_parks_the_document_with_its_reason() -> None:
    event = created(doc("d1"), at(5), building=UNMAPPED)
    plan = plan_document(PublishedView(), routing(), event)
    assert plan.outcome is Outcome.PARKED
    assert plan.operations == ()
    (parked,) = plan.records
    assert isinstance(parked, DocumentRecord)
    assert (parked.status, parked.parked_reason, parked.document) == (
        DocStatus.PARKED,
        "unmapped_building",
        event.document,
    )
    again = plan_document(view_of(parked), routing(), created(doc("d1"), at(6), UNMAPPED))
    assert again == Plan(Outcome.PARKED)  # nothing new to write


def test_a_held_withdrawal_published_again_later_is_unheld() -> None:
    view = view_of(published(doc("d1"), status=DocStatus.DELETE_HELD, held_by="snap"))
    plan = plan_document(view, routing(), created(doc("d1"), at(5)))
    assert statuses(plan) == {"d1": DocStatus.PUBLISHED}


# -- manifests: the backfill lane -----------------------------------------------------------------


def test_first_publication_history_sends_everything_forwardable() -> None:
    items = [doc("d1"), doc("d2", module="contrats"), doc("d3", audience="individual")]
    plan = plan_manifest(PublishedView(), routing(), manifest(at(0), *items), GUARD)
    assert plan.outcome is Outcome.APPLIED
    assert set(uploads(plan)) == {"d1", "d2"}
    assert {u.lane for u in uploads(plan).values()} == {Lane.BACKFILL}
    assert {u.seen_at for u in uploads(plan).values()} == {at(0)}
    assert plan.records[-1] == decided(at(0), Module.AG, Module.CONTRATS)


def test_first_publication_since_records_older_documents_as_baseline() -> None:
    items = [doc("old", date="2023-12-31"), doc("new", date="2024-01-01")]
    plan = plan_manifest(
        PublishedView(), routing("since:2024-01-01"), manifest(at(0), *items), GUARD
    )
    assert set(uploads(plan)) == {"new"}
    assert statuses(plan) == {"old": DocStatus.BASELINE}


def test_first_publication_fresh_sends_nothing_and_keeps_what_is_published() -> None:
    view = view_of(published(doc("live"), seen_at=at(-5)))  # came live before the first manifest
    items = [doc("d1"), doc("d2"), doc("live")]
    plan = plan_manifest(view, routing("fresh"), manifest(at(0), *items), GUARD)
    assert plan.operations == ()
    assert statuses(plan) == {"d1": DocStatus.BASELINE, "d2": DocStatus.BASELINE}


def applied(view: PublishedView, plan: Plan) -> PublishedView:
    for record in plan.records:
        view.apply(record)
    return view


def test_an_agency_added_to_the_routing_later_gets_its_own_first_publication() -> None:
    # LSC publishes for every agency; this one is not served yet, so nothing is decided for it.
    unserved = RoutingTable.from_mapping(
        {"agencies": {"agence-nice": {"modules": ["ag"], "first_publication": "history"}}}
    )
    view = PublishedView()
    before = plan_manifest(view, unserved, manifest(at(0), doc("d1"), doc("d2")), GUARD)
    assert before.outcome is Outcome.UNSERVED
    assert before.operations == ()
    assert applied(view, before).building(AGENCY, BUILDING) is None

    # Onboarded in "fresh" mode: its next manifest is its first publication, sent nothing.
    plan = plan_manifest(view, routing("fresh"), manifest(at(10), doc("d1"), doc("d2")), GUARD)
    assert plan.operations == ()
    assert statuses(plan) == {"d1": DocStatus.BASELINE, "d2": DocStatus.BASELINE}


def test_a_module_enabled_later_follows_the_agency_first_publication_mode() -> None:
    ag_only = RoutingTable.from_mapping(
        {
            "agencies": {
                AGENCY: {
                    "modules": ["ag"],
                    "first_publication": "fresh",
                    "condominia": {BUILDING: "8841"},
                }
            }
        }
    )
    view = PublishedView()
    items = [doc("pv"), doc("contrat", module="contrats")]
    first = plan_manifest(view, ag_only, manifest(at(0), *items), GUARD)
    applied(view, first)
    decided_modules = view.building(AGENCY, BUILDING)
    assert decided_modules is not None
    assert set(decided_modules.manifest_taken_at) == {Module.AG}

    # "contrats" enabled: still fresh for it, so its history is baseline, not sent.
    plan = plan_manifest(view, routing("fresh"), manifest(at(10), *items), GUARD)
    assert plan.operations == ()
    assert statuses(plan) == {"contrat": DocStatus.BASELINE}


def test_later_manifests_send_new_and_changed_documents_only() -> None:
    view = view_of(
        decided(at(0), Module.AG, Module.CONTRATS),
        published(doc("same")),
        published(doc("changed")),
        published(doc("base"), status=DocStatus.BASELINE, remote_id=None),
        published(doc("base2"), status=DocStatus.BASELINE, remote_id=None),
    )
    items = [doc("same"), doc("changed", "v2"), doc("base"), doc("base2", "v2"), doc("new")]
    plan = plan_manifest(view, routing("fresh"), manifest(at(10), *items), GUARD)
    sent = uploads(plan)
    assert set(sent) == {"changed", "base2", "new"}
    assert sent["changed"].remote_id == "r-changed"
    assert sent["base2"].remote_id is None
    assert statuses(plan) == {}


def test_documents_absent_from_a_manifest_are_withdrawn_if_seen_before_it() -> None:
    view = view_of(
        *(published(doc(f"keep{i}")) for i in range(4)),
        published(doc("gone"), seen_at=at(5)),
        published(doc("after"), seen_at=at(15)),  # created after the snapshot was taken
    )
    items = [doc(f"keep{i}") for i in range(4)]
    plan = plan_manifest(view, routing(), manifest(at(10), *items), GUARD)
    (withdrawal,) = deletes(plan).values()
    assert (withdrawal.key, withdrawal.condominium_id, withdrawal.remote_id) == (
        key("gone"),
        "8841",
        "r-gone",
    )
    # Once done, a marker of when stands for it (see the test of a crash below).
    after = deleted_record(withdrawal)
    assert isinstance(after, DocumentRecord)
    assert (after.status, after.seen_at, after.remote_id) == (DocStatus.FILTERED, at(10), None)


def test_a_withdrawal_survives_a_crash_that_loses_the_manifest_applied_record() -> None:
    # A manifest's "applied" record waits for the building's work (an upload still running);
    # its withdrawals are durable as soon as the partner acknowledged them. After a crash
    # between the two, the older input read again (an earlier manifest whose own record also
    # waited, the document's event) must not publish the withdrawn document a second time.
    keep = [doc(f"keep{i}") for i in range(4)]
    restored = view_of(*(published(d) for d in keep), published(doc("gone"), seen_at=at(5)))
    plan = plan_manifest(restored, routing(), manifest(at(10), *keep), GUARD)
    (withdrawal,) = deletes(plan).values()
    restored.apply(deleted_record(withdrawal))  # what the state topic holds after the crash

    earlier = plan_manifest(restored, routing(), manifest(at(8), *keep, doc("gone")), GUARD)
    assert uploads(earlier) == {}
    assert plan_document(restored, routing(), created(doc("gone"), at(5))).operations == ()
    # A newer manifest listing it again, or a newer event, publishes it again; a newer one
    # without it forgets it.
    again = plan_manifest(restored, routing(), manifest(at(12), *keep, doc("gone")), GUARD)
    assert set(uploads(again)) == {"gone"}
    assert set(uploads(plan_document(restored, routing(), created(doc("gone"), at(11))))) == {
        "gone"
    }
    assert tombstones(plan_manifest(restored, routing(), manifest(at(12), *keep), GUARD)) == {
        "gone"
    }


def test_a_version_filtered_by_a_manifest_is_not_brought_back_by_an_earlier_one_read_again() -> (
    None
):
    # The same crash, when the manifest withdraws a document because its audience changed.
    owners = doc("d1", "v2", audience="individual")
    restored = view_of(published(doc("d1")))
    plan = plan_manifest(restored, routing(), manifest(at(10), owners), GUARD)
    (withdrawal,) = deletes(plan).values()
    restored.apply(deleted_record(withdrawal))
    earlier = manifest(at(8), doc("d1"))
    assert uploads(plan_manifest(restored, routing(), earlier, GUARD)) == {}
    # And when an event had already withdrawn it: a manifest listing the filtered version
    # does not forget the marker, which would be durable before that manifest is.
    remembered = view_of(*plan_document(PublishedView(), routing(), created(owners, at(9))).records)
    listing = plan_manifest(remembered, routing(), manifest(at(10), owners), GUARD)
    for record in listing.records:
        if not isinstance(record, BuildingRecord):  # lost in the crash
            remembered.apply(record)
    assert uploads(plan_manifest(remembered, routing(), earlier, GUARD)) == {}


def test_only_what_the_relay_published_is_ever_deleted() -> None:
    view = view_of(
        published(doc("keep")),
        published(doc("base"), status=DocStatus.BASELINE, remote_id=None),
        published(doc("park"), status=DocStatus.PARKED, remote_id=None, parked_reason="x"),
    )
    plan = plan_manifest(view, routing(), manifest(at(10), doc("keep")), GUARD)
    assert deletes(plan) == {}
    assert tombstones(plan) == {"base", "park"}  # forgotten, never a partner call


def test_modules_the_manifest_does_not_cover_are_untouched() -> None:
    view = view_of(published(doc("keep")), published(doc("c1", module="contrats")))
    plan = plan_manifest(view, routing(), manifest(at(10), doc("keep"), modules=[Module.AG]), GUARD)
    assert deletes(plan) == {}
    assert plan.records[-1] == decided(at(10), Module.AG)


def test_a_stale_manifest_changes_nothing_and_a_partly_stale_one_only_its_new_modules() -> None:
    view = view_of(
        decided(at(10), Module.AG), published(doc("a1")), published(doc("c1", module="contrats"))
    )
    stale = manifest(at(5), modules=[Module.AG])
    assert plan_manifest(view, routing(), stale, GUARD) == Plan(Outcome.STALE)
    partly = plan_manifest(view, routing(), manifest(at(5), doc("new", module="contrats")), GUARD)
    assert set(uploads(partly)) == {"new"}
    assert set(deletes(partly)) == {"c1"}  # a1 is in the stale module: left alone
    assert partly.records[-1] == BuildingRecord(
        AGENCY, BUILDING, {Module.AG: at(10), Module.CONTRATS: at(5)}, True
    )


def test_a_manifest_never_rolls_back_a_version_published_after_it_was_taken() -> None:
    view = view_of(decided(at(0), Module.AG), published(doc("d1", "v2"), seen_at=at(15)))
    plan = plan_manifest(view, routing(), manifest(at(10), doc("d1", "v1")), GUARD)
    assert uploads(plan) == {}


def test_listed_documents_that_routing_now_filters_are_withdrawn() -> None:
    view = view_of(published(doc("d1")))
    plan = plan_manifest(view, routing(), manifest(at(10), doc("d1", audience="individual")), GUARD)
    assert set(deletes(plan)) == {"d1"}


def test_an_unmapped_building_parks_its_backfill() -> None:
    plan = plan_manifest(
        PublishedView(), routing(), manifest(at(0), doc("d1"), building=UNMAPPED), GUARD
    )
    assert plan.operations == ()
    assert statuses(plan) == {"d1": DocStatus.PARKED}


# -- the mass-deletion guard ----------------------------------------------------------------------


def test_an_empty_manifest_holds_instead_of_wiping() -> None:
    view = view_of(published(doc("d1")), published(doc("d2")))
    plan = plan_manifest(view, routing(), manifest(at(10)), GUARD)
    assert plan.outcome is Outcome.HELD
    assert plan.operations == ()
    held = [r for r in plan.records if isinstance(r, DocumentRecord)]
    assert {(r.key.document_id, r.status) for r in held} == {
        ("d1", DocStatus.DELETE_HELD),
        ("d2", DocStatus.DELETE_HELD),
    }


def test_a_truncated_manifest_holds_and_a_later_full_one_unholds() -> None:
    documents = [doc(f"d{i}") for i in range(10)]
    view = view_of(*(published(d) for d in documents))
    truncated = manifest(at(10), *documents[:3])
    plan = plan_manifest(view, routing(), truncated, GUARD)
    assert plan.outcome is Outcome.HELD
    assert {r.held_by for r in plan.records if isinstance(r, DocumentRecord)} == {
        truncated.snapshot_id
    }
    for record in plan.records:
        view.apply(record)
    assert view.held_count == 7
    full = plan_manifest(view, routing(), manifest(at(20), *documents[:9]), GUARD)
    assert full.outcome is Outcome.APPLIED
    assert set(deletes(full)) == {"d9"}
    assert statuses(full) == {f"d{i}": DocStatus.PUBLISHED for i in range(3, 9)}


def test_the_operator_releases_or_discards_held_withdrawals() -> None:
    held = published(doc("d1"), status=DocStatus.DELETE_HELD, held_by="snap")
    view = view_of(held, published(doc("d2")))
    assert deletes(release_held(view, AGENCY, BUILDING)) == {
        "d1": Delete(key("d1"), "8841", "r-d1")
    }
    discarded = discard_held(view, routing(), AGENCY, BUILDING)
    assert discarded.records == (
        dataclasses.replace(held, status=DocStatus.PUBLISHED, held_by=None),
    )
    assert release_held(view, AGENCY, UNMAPPED).operations == ()


# -- around the partner call, and after a configuration fix ---------------------------------------


def test_intent_then_published_record_around_an_upload() -> None:
    upload = Upload(key("d1"), doc("d1"), "8841", Lane.LIVE, at(5))
    intent = intent_record(upload)
    assert (intent.status, intent.remote_id, intent.sha256, intent.seen_at) == (
        DocStatus.UPLOADING,
        None,
        doc("d1").content.sha256,
        at(5),
    )
    done = published_record(upload, "r-9", doc("d1").content.sha256)
    assert (done.status, done.remote_id, done.condominium_id) == (
        DocStatus.PUBLISHED,
        "r-9",
        "8841",
    )


def test_parked_documents_are_retried_once_the_building_is_mapped() -> None:
    plan = plan_document(PublishedView(), routing(), created(doc("d1"), at(5), building=UNMAPPED))
    view = view_of(*plan.records)
    fixed = RoutingTable.from_mapping(
        {
            "agencies": {
                AGENCY: {
                    "modules": ["ag"],
                    "first_publication": "history",
                    "condominia": {UNMAPPED: "9000"},
                }
            }
        }
    )
    assert retry_parked(view, routing()).operations == ()
    retried = uploads(retry_parked(view, fixed))
    assert (retried["d1"].condominium_id, retried["d1"].lane) == ("9000", Lane.BACKFILL)


def test_the_dry_run_counts_documents_bytes_and_time_before_anything_is_sent() -> None:
    items = [
        doc("old", date="2023-01-01"),
        doc("new1", date="2024-02-01"),
        doc("new2", date="2024-03-01", module="contrats"),
        doc("private", audience="individual"),
    ]
    view = view_of(published(doc("gone"), seen_at=at(-5)))
    dry = plan_first_publication(view, routing("since:2024-01-01"), manifest(at(0), *items))
    assert [
        (line.module, line.uploads, line.upload_bytes, line.baseline, line.deletes)
        for line in dry.lines
    ] == [
        (Module.AG, 1, 1000, 1, 1),
        (Module.CONTRATS, 1, 1000, 0, 0),
    ]
    assert (dry.uploads, dry.upload_bytes, dry.baseline, dry.deletes) == (2, 2000, 1, 1)
    assert dry.estimated_seconds(rate_per_second=2.0) == 1.5
    assert view.size == 1  # nothing applied


# -- approval of a first publication -------------------------------------------------------------


def _approval_routing(first_publication: str, approval: str) -> RoutingTable:
    return RoutingTable.from_mapping(
        {
            "agencies": {
                AGENCY: {
                    "modules": ["ag", "contrats"],
                    "first_publication": first_publication,
                    "approval": approval,
                    "condominia": {BUILDING: "8841"},
                }
            }
        }
    )


@pytest.mark.parametrize(
    ("first_publication", "approval", "waits"),
    [
        ("history", "operator", {"ag", "contrats"}),
        ("since:2024-01-01", "operator", {"ag", "contrats"}),
        ("fresh", "operator", set()),
        ("history", "auto", set()),
    ],
)
def test_a_first_publication_that_sends_history_waits_for_approval_unless_told_otherwise(
    first_publication: str, approval: str, waits: set[str]
) -> None:
    table = _approval_routing(first_publication, approval)
    view = PublishedView()
    snapshot = manifest(at(0), doc("a"), doc("b", module="contrats"))

    plan = plan_manifest(view, table, snapshot, GUARD)

    assert unapproved_modules(view, table, snapshot, plan) == waits


def test_an_approval_covers_its_modules_and_a_module_enabled_later_waits_again() -> None:
    table = _approval_routing("history", "operator")
    view = PublishedView()
    view.apply(
        AgencyRecord(AGENCY, approved_plan="ab" * 8, approved_modules=frozenset({Module.AG}))
    )
    snapshot = manifest(at(0), doc("a"), doc("b", module="contrats"))

    plan = plan_manifest(view, table, snapshot, GUARD)

    assert unapproved_modules(view, table, snapshot, plan) == {"contrats"}
    view.apply(BuildingRecord(AGENCY, BUILDING, {Module.AG: at(-5), Module.CONTRATS: at(-5)}, True))
    later = manifest(at(10), doc("a"), doc("c", module="contrats"))
    assert unapproved_modules(view, table, later, plan_manifest(view, table, later, GUARD)) == set()


# -- a held manifest: the building's question ------------------------------------------------------


def held_building(taken_at: dt.datetime, snapshot_id: str) -> BuildingRecord:
    question = HeldManifest(snapshot_id, taken_at, frozenset({Module.AG, Module.CONTRATS}))
    return BuildingRecord(AGENCY, BUILDING, {}, first_publication_done=False, held=question)


def test_a_held_manifest_decides_nothing_yet_and_its_withdrawals_and_queued_uploads_wait() -> None:
    sent, queued, kept = doc("d1"), doc("d2"), doc("d3")
    view = view_of(
        published(sent, at(1)),
        published(queued, at(2), status=DocStatus.UPLOADING, remote_id=None),
        published(kept, at(3)),
    )
    empty = manifest(at(10))
    plan = plan_manifest(view, routing(), empty, GUARD)
    assert plan.outcome is Outcome.HELD
    assert plan.operations == ()
    assert statuses(plan) == {"d1": DocStatus.DELETE_HELD, "d3": DocStatus.DELETE_HELD}
    # the queued upload is held where it waits: the executor records what it becomes
    assert [(m.key.document_id, m.status, m.held_by) for m in plan.marks] == [
        ("d2", DocStatus.UPLOAD_HELD, empty.snapshot_id)
    ]
    [building] = [r for r in plan.records if isinstance(r, BuildingRecord)]
    assert building.manifest_taken_at == {}  # undecided: later events are not superseded
    assert building.held == HeldManifest(
        empty.snapshot_id, at(10), frozenset({Module.AG, Module.CONTRATS})
    )


def test_a_live_document_the_held_manifest_decides_waits_with_its_content() -> None:
    view = view_of(held_building(at(10), "snap"))
    before, after = doc("d1"), doc("d2")
    waiting = plan_document(view, routing(), created(before, at(5)))
    assert waiting.outcome is Outcome.WAITING
    [record] = waiting.records
    assert isinstance(record, DocumentRecord)
    assert (record.status, record.held_by, record.document) == (
        DocStatus.UPLOAD_HELD,
        "snap",
        before,
    )
    assert plan_document(view, routing(), created(after, at(11))).outcome is Outcome.UPLOAD


def test_discard_sends_what_waited_and_release_decides_the_building() -> None:
    waiting = dataclasses.replace(
        published(doc("d1"), at(5), status=DocStatus.UPLOAD_HELD, remote_id=None),
        held_by="snap",
        document=doc("d1"),
    )
    held = published(doc("d2"), at(4), status=DocStatus.DELETE_HELD, held_by="snap")
    view = view_of(held_building(at(10), "snap"), waiting, held)

    discarded = discard_held(view, routing(), AGENCY, BUILDING)
    assert set(uploads(discarded)) == {"d1"}
    assert statuses(discarded) == {"d2": DocStatus.PUBLISHED}
    [building] = [r for r in discarded.records if isinstance(r, BuildingRecord)]
    assert building.held is not None
    assert building.held.decision is HoldDecision.DISCARD
    assert building.manifest_taken_at == {}

    released = release_held(view, AGENCY, BUILDING)
    assert set(deletes(released)) == {"d2"}
    assert statuses(released) == {"d1": DocStatus.FILTERED}  # never sent, decided at taken_at
    [building] = [r for r in released.records if isinstance(r, BuildingRecord)]
    assert building.held is not None
    assert building.held.decision is HoldDecision.RELEASE
    assert building.manifest_taken_at == dict.fromkeys((Module.AG, Module.CONTRATS), at(10))


def test_a_newer_manifest_replaces_the_held_one_and_an_older_one_is_stale() -> None:
    held = published(doc("d1"), at(4), status=DocStatus.DELETE_HELD, held_by="snap")
    other = published(doc("d2"), at(4), status=DocStatus.DELETE_HELD, held_by="snap")
    view = view_of(held_building(at(10), "snap"), held, other)
    assert plan_manifest(view, routing(), manifest(at(9), doc("d1")), GUARD).outcome is (
        Outcome.STALE
    )
    newer = plan_manifest(view, routing(), manifest(at(11), doc("d1")), GUARD)
    assert newer.outcome is Outcome.APPLIED
    assert statuses(newer) == {"d1": DocStatus.PUBLISHED}  # listed again: wanted after all
    assert set(deletes(newer)) == {"d2"}
    [building] = [r for r in newer.records if isinstance(r, BuildingRecord)]
    assert building.held is None
