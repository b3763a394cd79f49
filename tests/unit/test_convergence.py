"""The property the relay stands on: whatever order it reads the two topics in, it converges.

LSC's truth is modelled over time (documents created, changed, unpublished, across buildings,
modules and audiences). LSC emits document-created events and manifest snapshots, split into
parts, some parts duplicated, some snapshots left incomplete. The relay reads the two topics in
an arbitrary interleaving (each topic in its own order), plans against its view, and an in-memory
partner carries out the operations. Once a final complete manifest covering every module has
been processed, the partner holds exactly LSC's truth filtered by routing: the right contents,
the relay's documents only, documents created by hand untouched, nothing routing forbids ever
sent. An empty or truncated manifest never wipes a building.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from dataclasses import dataclass, field

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.core.events import Audience, Document, DocumentCreated, ManifestSnapshot, Module
from consumer.core.guard import DeletionGuard
from consumer.core.manifest import ManifestAssembler
from consumer.core.planning.actions import release_held, retry_parked
from consumer.core.planning.documents import plan_document
from consumer.core.planning.manifests import plan_manifest, plan_manifest_in_steps
from consumer.core.planning.plan import (
    Delete,
    Plan,
    Upload,
    deleted_record,
    intent_record,
    published_record,
    run_to_end,
)
from consumer.core.routing import Action, RoutingTable
from consumer.core.state import DocKey, DocStatus
from consumer.core.view import PublishedView

AGENCY = "agence-lyon"
MAPPED = {"bat-1": "c1", "bat-2": "c2"}
BUILDINGS = [*MAPPED, "bat-3"]  # bat-3 is not mapped: its documents are parked
MODULES = [Module.AG, Module.CONTRATS, Module.DIAGNOSTICS]  # diagnostics is not enabled
DATES = ["2023-06-01", "2024-06-01"]  # on each side of since:2024-01-01
T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
READ_AT = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)  # the assembler's clock: nothing expires


def routing(first_publication: str) -> RoutingTable:
    return RoutingTable.from_mapping(
        {
            "agencies": {
                AGENCY: {
                    "modules": ["ag", "contrats"],
                    "audiences": ["building", "council"],
                    "first_publication": first_publication,
                    "condominia": MAPPED,
                }
            }
        }
    )


def document(
    document_id: str, version: int, module: Module, audience: Audience, date: str
) -> Document:
    return msgspec.convert(
        {
            "id": document_id,
            "module": str(module),
            "category": "PV",
            "title": f"{document_id} v{version}",
            "document_date": date,
            "audience": str(audience),
            "content": {
                "media_type": "application/pdf",
                "size_bytes": 1000 + version,
                "sha256": hashlib.sha256(f"{document_id}/{version}".encode()).hexdigest(),
                "url": f"https://documents.lsc.example/{document_id}/{version}.pdf",
            },
        },
        type=Document,
    )


# -- LSC ------------------------------------------------------------------------------------------


@dataclass
class Lsc:
    """LSC's truth over time, and what it published on each topic, in topic order."""

    truth: dict[str, tuple[str, Document]] = field(default_factory=dict)  # id -> building, doc
    version_times: dict[str, list[dt.datetime]] = field(default_factory=dict)
    events: list[DocumentCreated] = field(default_factory=list)
    parts: list[ManifestSnapshot] = field(default_factory=list)
    ids: int = 0

    def uuid(self) -> str:
        self.ids += 1
        return str(uuid.UUID(int=self.ids))

    def publish(self, building: str, doc: Document, when: dt.datetime) -> None:
        self.truth[doc.id] = (building, doc)
        self.version_times.setdefault(doc.id, []).append(when)
        self.events.append(
            msgspec.convert(
                {
                    "schema_version": 1,
                    "event_type": "document-created",
                    "event_id": self.uuid(),
                    "occurred_at": when.isoformat(),
                    "agency_id": AGENCY,
                    "building_id": building,
                    "document": doc,
                },
                type=DocumentCreated,
            )
        )

    def snapshot(
        self, building: str, modules: list[Module], when: dt.datetime, cuts: list[int]
    ) -> list[ManifestSnapshot]:
        items = [d for b, d in self.truth.values() if b == building and d.module in modules]
        bounds = [0, *sorted(min(cut, len(items)) for cut in cuts), len(items)]
        common = {
            "schema_version": 1,
            "event_type": "manifest-snapshot",
            "snapshot_id": self.uuid(),
            "taken_at": when.isoformat(),
            "agency_id": AGENCY,
            "building_id": building,
            "modules": [str(m) for m in modules],
            "parts": len(bounds) - 1,
            "item_count": len(items),
        }
        return [
            msgspec.convert(
                {**common, "part": n, "items": items[bounds[n - 1] : bounds[n]]},
                type=ManifestSnapshot,
            )
            for n in range(1, len(bounds))
        ]


@st.composite
def lsc_histories(draw: st.DrawFn) -> Lsc:
    lsc = Lsc()
    when = T0
    live_ids = st.builds(lambda: sorted(lsc.truth))

    def create() -> None:
        building = draw(st.sampled_from(BUILDINGS))
        doc = document(
            f"d{len(lsc.version_times)}:att-1",
            1,
            draw(st.sampled_from(MODULES)),
            draw(st.sampled_from(list(Audience))),
            draw(st.sampled_from(DATES)),
        )
        lsc.publish(building, doc, when)

    def change() -> None:
        ids = draw(live_ids)
        if ids:
            building, old = lsc.truth[draw(st.sampled_from(ids))]
            version = len(lsc.version_times[old.id]) + 1
            new = document(
                old.id,
                version,
                old.module,
                draw(st.sampled_from(list(Audience))),
                old.document_date.isoformat(),
            )
            lsc.publish(building, new, when)

    for step in draw(st.lists(st.sampled_from("ccxus"), min_size=3, max_size=40)):
        when += dt.timedelta(minutes=1)
        if step == "c":
            create()
        elif step == "x":
            change()
        elif step == "u" and (ids := draw(live_ids)):
            del lsc.truth[draw(st.sampled_from(ids))]  # LSC unpublishes: no event, manifests tell
        elif step == "s":
            building = draw(st.sampled_from(BUILDINGS))
            modules = draw(st.lists(st.sampled_from(MODULES), min_size=1, unique=True))
            cuts = draw(st.lists(st.integers(0, 8), max_size=2))
            parts = lsc.snapshot(building, modules, when, cuts)
            if len(parts) > 1 and draw(st.booleans()):
                parts.pop(draw(st.integers(0, len(parts) - 1)))  # never completes
            if draw(st.booleans()):
                parts.append(draw(st.sampled_from(parts)))  # delivered twice
            lsc.parts += parts
    for building in BUILDINGS:  # the final manifests: complete, every module
        when += dt.timedelta(minutes=1)
        cuts = draw(st.lists(st.integers(0, 8), max_size=2))
        lsc.parts += lsc.snapshot(building, MODULES, when, cuts)
    for step in draw(st.lists(st.sampled_from("cx"), max_size=3)):  # after the final manifests
        when += dt.timedelta(minutes=1)
        create() if step == "c" else change()
    return lsc


# -- the partner and the relay --------------------------------------------------------------------


@dataclass
class Partner:
    """ChouetteCopro in memory: remote id -> (condominium, reference, sha256)."""

    routing: RoutingTable
    documents: dict[str, tuple[str, str | None, str]] = field(default_factory=dict)
    uploads: int = 0

    def __post_init__(self) -> None:
        for condominium in MAPPED.values():  # created by hand in ChouetteCopro
            self.documents[f"manual-{condominium}"] = (condominium, None, "manual")

    def upload(self, op: Upload) -> str:
        building = op.key.building_id
        verdict = self.routing.decide(op.key.agency_id, building, op.document)
        assert verdict.action is Action.FORWARD, f"{op.document.id} must never be sent"
        assert op.document.audience is not Audience.INDIVIDUAL
        self.uploads += 1
        if op.remote_id is not None:
            condominium, reference, _ = self.documents[op.remote_id]
            assert reference == op.key.document_id
            self.documents[op.remote_id] = (condominium, reference, op.document.content.sha256)
            return op.remote_id
        for condominium, reference, _ in self.documents.values():
            assert (condominium, reference) != (op.condominium_id, op.key.document_id), "twice"
        remote_id = f"r{len(self.documents)}-{self.uploads}"
        self.documents[remote_id] = (
            op.condominium_id,
            op.key.document_id,
            op.document.content.sha256,
        )
        return remote_id

    def delete(self, op: Delete) -> None:
        assert op.remote_id is not None
        _, reference, _ = self.documents.pop(op.remote_id)
        assert reference == op.key.document_id, "only what the relay published is deleted"

    def relay_documents(self) -> dict[tuple[str, str], str]:
        return {(c, ref): sha for c, ref, sha in self.documents.values() if ref is not None}


@dataclass
class Relay:
    """Planner, view and assembler of one partition, executing operations synchronously."""

    routing: RoutingTable
    guard: DeletionGuard
    partner: Partner
    view: PublishedView = field(default_factory=PublishedView)
    assembler: ManifestAssembler = field(
        default_factory=lambda: ManifestAssembler(
            expiry=dt.timedelta(days=1), max_pending_items=10_000
        )
    )
    cut_over: dict[tuple[str, Module], dt.datetime] = field(default_factory=dict)
    read_before_cut_over: set[str] = field(default_factory=set)
    offset: int = 0

    def read_event(self, event: DocumentCreated) -> None:
        if (event.building_id, event.document.module) not in self.cut_over:
            self.read_before_cut_over.add(event.document.id)
        self.run(plan_document(self.view, self.routing, event))

    def read_part(self, part: ManifestSnapshot) -> None:
        self.offset += 1
        result = self.assembler.add(part, offset=self.offset, now=READ_AT)
        if result.complete is not None:
            plan = plan_manifest(self.view, self.routing, result.complete, self.guard)
            # Planned in steps (the relay pauses between them on a large manifest): the same plan.
            stepped = plan_manifest_in_steps(
                self.view, self.routing, result.complete, self.guard, step=1
            )
            assert run_to_end(stepped) == plan
            if not result.complete.items:
                assert not any(isinstance(op, Delete) for op in plan.operations)
            self.run(plan)
            self.note_cut_over(part.building_id)

    def note_cut_over(self, building_id: str) -> None:
        building = self.view.building(AGENCY, building_id)
        for module, taken_at in (building.manifest_taken_at if building else {}).items():
            self.cut_over.setdefault((building_id, module), taken_at)

    def run(self, plan: Plan) -> None:
        for record in plan.records:
            self.view.apply(record)
        for op in plan.operations:
            if isinstance(op, Upload):
                self.view.apply(intent_record(op))
                remote_id = self.partner.upload(op)
                self.view.apply(published_record(op, remote_id, op.document.content.sha256))
            else:
                self.partner.delete(op)
                self.view.apply(deleted_record(op))


def replay(lsc: Lsc, order: list[bool], first_publication: str, guard: DeletionGuard) -> Relay:
    """Read both topics, each in its order, interleaved as ``order`` says (True: a document)."""
    table = routing(first_publication)
    relay = Relay(table, guard, Partner(table))
    events, parts = iter(lsc.events), iter(lsc.parts)
    for pick_event in order:
        source = (events, parts) if pick_event else (parts, events)
        for stream in source:
            item = next(stream, None)
            if item is not None:
                break
        if isinstance(item, DocumentCreated):
            relay.read_event(item)
        elif isinstance(item, ManifestSnapshot):
            relay.read_part(item)
    for building in BUILDINGS:  # the operator looks at held manifests and releases them
        relay.run(release_held(relay.view, AGENCY, building))
        relay.note_cut_over(building)
    return relay


def bounds(lsc: Lsc, relay: Relay) -> tuple[dict[tuple[str, str], str], set[tuple[str, str]]]:
    """What the partner must hold, and what it may hold besides: routed truth, less what the
    first publication leaves out. A document whose event was read before its module's cut-over
    manifest may have been sent already, and then stays (with the current content)."""
    mode = relay.routing.agencies[AGENCY].first_publication
    required: dict[tuple[str, str], str] = {}
    allowed: set[tuple[str, str]] = set()
    for document_id, (building, doc) in lsc.truth.items():
        verdict = relay.routing.decide(AGENCY, building, doc)
        if verdict.condominium_id is None:
            continue
        place = (verdict.condominium_id, document_id)
        cut_over = relay.cut_over[(building, doc.module)]
        if mode.sends(doc.document_date) or lsc.version_times[document_id][-1] > cut_over:
            required[place] = doc.content.sha256
            allowed.add(place)
        elif document_id in relay.read_before_cut_over:
            allowed.add(place)
    return required, allowed


def orders(lsc: Lsc) -> st.SearchStrategy[list[bool]]:
    total = len(lsc.events) + len(lsc.parts)
    return st.lists(st.booleans(), min_size=total, max_size=total)


GUARD = DeletionGuard(max_share=0.5, min_count=2)


def check_convergence(lsc: Lsc, order: list[bool], first_publication: str) -> None:
    relay = replay(lsc, order, first_publication, GUARD)
    partner = relay.partner
    held = partner.relay_documents()
    required, allowed = bounds(lsc, relay)
    assert required.items() <= held.items()
    assert set(held) <= allowed
    for (_, document_id), sha in held.items():
        assert lsc.truth[document_id][1].content.sha256 == sha  # always the current content
    if first_publication == "history":
        assert held == required
    for condominium in MAPPED.values():
        assert partner.documents[f"manual-{condominium}"] == (condominium, None, "manual")
    published = {
        (r.condominium_id, r.key.document_id): r.sha256
        for r in relay.view.with_status(DocStatus.PUBLISHED)
    }
    assert published == partner.relay_documents()  # the view knows what the partner holds
    assert relay.view.held_count == 0
    assert relay.view.count(DocStatus.UPLOADING) == 0
    parked = {r.key.document_id: r.sha256 for r in relay.view.parked()}
    for document_id, sha in parked.items():
        building, doc = lsc.truth[document_id]  # nothing withdrawn stays parked
        assert (building, doc.content.sha256) == ("bat-3", sha)


@settings(max_examples=500, deadline=None)
@given(data=st.data(), lsc=lsc_histories())
def test_history_mode_converges_to_lsc_truth_filtered_by_routing(
    data: st.DataObject, lsc: Lsc
) -> None:
    order = data.draw(orders(lsc))
    check_convergence(lsc, order, "history")
    relay = replay(lsc, order, "history", GUARD)
    routed_unmapped = {
        document_id
        for document_id, (building, doc) in lsc.truth.items()
        if building == "bat-3" and relay.routing.decide(AGENCY, "bat-3", doc).action is Action.PARK
    }
    assert {r.key.document_id for r in relay.view.parked()} == routed_unmapped


@settings(max_examples=300, deadline=None)
@given(data=st.data(), lsc=lsc_histories())
def test_fresh_mode_sends_only_what_came_after_cut_over(data: st.DataObject, lsc: Lsc) -> None:
    check_convergence(lsc, data.draw(orders(lsc)), "fresh")


@settings(max_examples=300, deadline=None)
@given(data=st.data(), lsc=lsc_histories())
def test_since_mode_sends_recent_history_and_what_came_after(data: st.DataObject, lsc: Lsc) -> None:
    check_convergence(lsc, data.draw(orders(lsc)), "since:2024-01-01")


@settings(max_examples=150, deadline=None)
@given(
    count=st.integers(min_value=1, max_value=12),
    data=st.data(),
)
def test_an_empty_or_truncated_manifest_never_wipes_a_building(
    count: int, data: st.DataObject
) -> None:
    table = routing("history")
    relay = Relay(table, GUARD, Partner(table))
    lsc = Lsc()
    for n in range(count):
        lsc.publish("bat-1", document(f"d{n}", 1, Module.AG, Audience.BUILDING, DATES[0]), T0)
    for event in lsc.events:
        relay.read_event(event)
    kept = data.draw(st.integers(min_value=0, max_value=count))
    for document_id in sorted(lsc.truth)[kept:]:
        del lsc.truth[document_id]  # a truncated export, or an empty one
    cuts = data.draw(st.lists(st.integers(0, 8), max_size=2))
    for part in data.draw(
        st.permutations(lsc.snapshot("bat-1", [Module.AG], T0 + dt.timedelta(hours=1), cuts))
    ):
        relay.read_part(part)
    deleting = count - kept
    on_partner = set(relay.partner.relay_documents())
    if kept == 0 or (deleting >= GUARD.min_count and deleting > GUARD.max_share * count):
        assert len(on_partner) == count  # nothing withdrawn: held for an operator
        assert relay.view.held_count == deleting
    else:
        assert on_partner == {("c1", document_id) for document_id in lsc.truth}


def test_parked_documents_flow_once_the_operator_maps_the_building() -> None:
    lsc = Lsc()
    doc = document("d1", 1, Module.AG, Audience.BUILDING, DATES[0])
    lsc.publish("bat-3", doc, T0)
    table = routing("history")
    relay = Relay(table, GUARD, Partner(table))
    relay.read_event(lsc.events[0])
    assert relay.partner.relay_documents() == {}
    fixed = RoutingTable.from_mapping(
        {
            "agencies": {
                AGENCY: {
                    "modules": ["ag"],
                    "first_publication": "history",
                    "condominia": {**MAPPED, "bat-3": "c3"},
                }
            }
        }
    )
    relay.partner.routing = relay.routing = fixed
    relay.run(retry_parked(relay.view, fixed))
    assert relay.partner.relay_documents() == {("c3", "d1"): doc.content.sha256}
    assert list(relay.view.parked()) == []
    assert relay.view.document(DocKey(AGENCY, "bat-3", "d1")) is not None
