"""A held manifest decides its whole building, whatever the order of reading and the crashes.

One building's history at LSC: documents created and changed, maybe a first manifest, then a
complete manifest that leaves documents out (LSC unpublished them, or its export is truncated: the
relay cannot tell), which the mass-deletion guard holds, then more documents, and maybe a newer
complete manifest that replaces it as the question. The relay reads the two topics in any
interleaving, manifests in parts; its partner work runs whenever it gets its turn (an upload may be
sent and not recorded yet); it commits now and then and crashes anywhere (a crash keeps only the
state topic and the committed offsets: the view is restored from the records written so far, the
upload intents reconciled, the input read again from the commit); and the operator answers each
hold (always the same way) once it shows in the state topic.

At quiescence the partner holds exactly what the model says for the newest manifest applied
(released, or never held): what it lists and what came after it was taken; every document's
newest version when none was (a discard: as if the held manifest had never come).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections import deque
from dataclasses import dataclass, field

import msgspec
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

from consumer.core.commands import HeldAction
from consumer.core.events import Audience, Document, DocumentCreated, ManifestSnapshot, Module
from consumer.core.guard import DeletionGuard
from consumer.core.manifest import ManifestAssembler
from consumer.core.planning.actions import discard_held, release_held
from consumer.core.planning.documents import plan_document
from consumer.core.planning.manifests import plan_manifest
from consumer.core.planning.plan import (
    Delete,
    Outcome,
    Plan,
    Upload,
    deleted_record,
    held_published_record,
    held_upload_record,
    intent_record,
    partner_sha256,
    published_record,
)
from consumer.core.routing import RoutingTable
from consumer.core.state import (
    BuildingRecord,
    DocKey,
    DocStatus,
    StateRecord,
    Tombstone,
)
from consumer.core.view import PublishedView

AGENCY, BUILDING, CONDOMINIUM = "agence-lyon", "bat-1", "c-1"
T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
READ_AT = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)  # the assembler's clock: nothing expires
GUARD = DeletionGuard(max_share=0.0, min_count=1)  # any withdrawal is held
ROUTING = RoutingTable.from_mapping(
    {
        "agencies": {
            AGENCY: {
                "modules": ["ag"],
                "audiences": ["building"],
                "first_publication": "history",
                "condominia": {BUILDING: CONDOMINIUM},
            }
        }
    }
)
EVENTS, MANIFESTS, COMMANDS = "documents", "manifests", "commands"


def document(document_id: str, version: int) -> Document:
    return msgspec.convert(
        {
            "id": document_id,
            "module": "ag",
            "category": "PV",
            "title": f"{document_id} v{version}",
            "document_date": "2023-06-01",
            "audience": str(Audience.BUILDING),
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
class History:
    """One building's events and manifests in topic order, and what each decision must leave."""

    events: list[DocumentCreated] = field(default_factory=list)
    manifests: list[ManifestSnapshot] = field(default_factory=list)
    truth: dict[str, Document] = field(default_factory=dict)  # what LSC publishes now
    newest: dict[str, Document] = field(default_factory=dict)  # every document's last version
    newest_at: dict[str, dt.datetime] = field(default_factory=dict)
    listed: dict[dt.datetime, set[str]] = field(default_factory=dict)  # per manifest's taken_at

    def publish(self, doc: Document, when: dt.datetime) -> None:
        self.truth[doc.id] = self.newest[doc.id] = doc
        self.newest_at[doc.id] = when
        self.events.append(
            msgspec.convert(
                {
                    "schema_version": 1,
                    "event_type": "document-created",
                    "event_id": f"00000000-0000-4000-8000-{len(self.events):012d}",
                    "occurred_at": when.isoformat(),
                    "agency_id": AGENCY,
                    "building_id": BUILDING,
                    "document": doc,
                },
                type=DocumentCreated,
            )
        )

    def snapshot(self, when: dt.datetime, parts: int) -> str:
        """A complete manifest of what LSC publishes now, in ``parts`` parts; its snapshot id."""
        items = list(self.truth.values())
        size = -(-len(items) // parts) if items else 0
        chunks = [items[n * size : (n + 1) * size] for n in range(parts)] if items else [[]]
        snapshot_id = f"00000000-0000-4000-9000-{len(self.manifests):012d}"
        self.listed[when] = set(self.truth)
        for number, chunk in enumerate(chunks, start=1):
            part = {
                "schema_version": 1,
                "event_type": "manifest-snapshot",
                "snapshot_id": snapshot_id,
                "taken_at": when.isoformat(),
                "agency_id": AGENCY,
                "building_id": BUILDING,
                "modules": ["ag"],
                "part": number,
                "parts": len(chunks),
                "item_count": len(items),
                "items": chunk,
            }
            self.manifests.append(msgspec.convert(part, type=ManifestSnapshot))
        return snapshot_id

    def expected(self, applied: dt.datetime | None) -> dict[str, str]:
        """Each document's reference on the partner and its sha256, once the newest manifest
        applied (released, or never held) is the one taken at ``applied``: what it lists and
        what came after it was taken; every document when none is."""
        return {
            doc_id: doc.content.sha256
            for doc_id, doc in self.newest.items()
            if applied is None or doc_id in self.listed[applied] or self.newest_at[doc_id] > applied
        }


@st.composite
def histories(draw: st.DrawFn) -> History:
    history = History()
    when = T0
    versions: dict[str, int] = {}

    def create() -> None:
        doc_id = f"d{len(versions)}"
        versions[doc_id] = 1
        history.publish(document(doc_id, 1), when)

    def change(among: list[str]) -> None:
        if among:
            doc_id = draw(st.sampled_from(among))
            versions[doc_id] += 1
            history.publish(document(doc_id, versions[doc_id]), when)

    first_manifest = draw(st.booleans())
    for step in draw(st.lists(st.sampled_from("ccx"), min_size=1, max_size=6)):
        when += dt.timedelta(minutes=1)
        create() if step == "c" or not versions else change(sorted(versions))
    if first_manifest:
        when += dt.timedelta(minutes=1)
        history.snapshot(when, draw(st.integers(1, 2)))  # lists everything: withdraws nothing
        for step in draw(st.lists(st.sampled_from("cx"), max_size=3)):
            when += dt.timedelta(minutes=1)
            create() if step == "c" else change(sorted(versions))
    # LSC's next complete manifest leaves documents out: the guard holds it.
    listed = draw(st.lists(st.sampled_from(sorted(history.truth)), unique=True))
    history.truth = {doc_id: history.truth[doc_id] for doc_id in sorted(listed)}
    when += dt.timedelta(minutes=1)
    history.snapshot(when, draw(st.integers(1, 2)))
    # After it was taken: new documents, new versions, documents it left out published again,
    # and maybe a newer complete manifest, which replaces it as the question (held or not).
    newer = draw(st.booleans())
    for step in draw(st.lists(st.sampled_from("cxr"), max_size=4)) + (["m"] if newer else []):
        when += dt.timedelta(minutes=1)
        if step == "c":
            create()
        elif step == "m":
            published = sorted(history.truth)
            listed = draw(st.lists(st.sampled_from(published), unique=True)) if published else []
            history.truth = {doc_id: history.truth[doc_id] for doc_id in sorted(listed)}
            history.snapshot(when, draw(st.integers(1, 2)))
        else:
            change(
                sorted(history.truth) if step == "x" else sorted(set(versions) - set(history.truth))
            )
    for step in draw(st.lists(st.sampled_from("cx"), max_size=2)) if newer else ():
        when += dt.timedelta(minutes=1)
        create() if step == "c" else change(sorted(history.truth))
    return history


# -- the partner ----------------------------------------------------------------------------------


@dataclass
class Partner:
    """ChouetteCopro in memory: remote id -> (reference, sha256)."""

    documents: dict[str, tuple[str, str]] = field(default_factory=dict)
    created: int = 0

    def upload(self, reference: str, sha256: str, remote_id: str | None) -> str:
        if remote_id is not None and remote_id in self.documents:
            self.documents[remote_id] = (reference, sha256)
            return remote_id
        assert self.find(reference) is None, f"{reference} created twice"
        self.created += 1
        remote_id = f"r{self.created}"
        self.documents[remote_id] = (reference, sha256)
        return remote_id

    def delete(self, remote_id: str) -> None:
        self.documents.pop(remote_id, None)  # a 404 is a withdrawal done

    def find(self, reference: str) -> tuple[str, str] | None:
        for remote_id, (ref, sha256) in self.documents.items():
            if ref == reference:
                return remote_id, sha256
        return None

    def references(self) -> dict[str, str]:
        return dict(self.documents.values())


# -- the relay: the processor's and executor's protocol around the pure core ----------------------


@dataclass(frozen=True)
class Remote:
    remote_id: str
    sha256: str


@dataclass(eq=False)
class Work:
    """One plan's work: its entries, its building record written last, its input offsets."""

    offsets: list[tuple[str, int]]
    deferred: list[BuildingRecord]
    earlier: list[Work]
    registered: bool = False  # building work: what a later building record waits for
    pending: int = 0
    done: bool = False


@dataclass(eq=False)
class Entry:
    work: Work
    operation: Upload | Delete | None = None
    record: StateRecord | None = None  # a plan's record written at its place in the chain
    sent: Remote | None = None  # an upload the partner carried out, its result not recorded


class Relay:
    """One partition of the relay, its partner work run one step at a time by the test.

    It follows ``PlanCompletion._execute`` and the executor: records applied at once and written
    (behind the work queued on their document), the building record written once the building's
    work is done, operations run in a chain per document, an upload's intent written before the
    call and its result after, a mark holding or letting go a queued upload.
    """

    def __init__(self, history: History, partner: Partner) -> None:
        self.inputs: dict[str, list[object]] = {
            EVENTS: list(history.events),
            MANIFESTS: list(history.manifests),
            COMMANDS: [],
        }
        self.committed = dict.fromkeys(self.inputs, 0)
        self.partner = partner
        self.changelog: list[StateRecord] = []
        self.start()

    # -- a process's life ---------------------------------------------------------------------
    def start(self) -> None:
        """A new process: the view restored from the state topic, intents reconciled."""
        self.view = restored(self.changelog)
        self.assembler = ManifestAssembler(expiry=dt.timedelta(days=1), max_pending_items=1000)
        self.position = dict(self.committed)
        self.open: dict[str, set[int]] = {topic: set() for topic in self.inputs}
        self.chains: dict[DocKey, deque[Entry]] = {}
        self.results: dict[DocKey, Remote | None] = {}  # what the chain's last operation left
        self.works: list[Work] = []
        self.uploads: dict[DocKey, list[Upload]] = {}
        self.holding: dict[DocKey, tuple[list[Upload], str]] = {}
        for intent in list(self.view.with_status(DocStatus.UPLOADING)):
            found = self.partner.find(intent.key.document_id)
            settled: StateRecord = (
                Tombstone(intent.key)
                if found is None
                else dataclasses.replace(
                    intent, status=DocStatus.PUBLISHED, remote_id=found[0], sha256=found[1]
                )
            )
            self.write(settled)
            self.view.apply(settled)

    def write(self, record: StateRecord) -> None:
        self.changelog.append(record)

    def commit(self) -> None:
        for topic, opened in self.open.items():
            self.committed[topic] = min(opened) if opened else self.position[topic]

    def done(self, offsets: list[tuple[str, int]]) -> None:
        for topic, offset in offsets:
            self.open[topic].discard(offset)

    # -- reading ------------------------------------------------------------------------------
    def read(self, topic: str) -> bool:
        offset = self.position[topic]
        if offset >= len(self.inputs[topic]):
            return False
        self.position[topic] += 1
        self.open[topic].add(offset)
        item = self.inputs[topic][offset]
        if isinstance(item, DocumentCreated):
            plan = plan_document(self.view, ROUTING, item)
            decided = plan.outcome in (Outcome.SUPERSEDED, Outcome.WAITING)
            self.execute(plan, [(topic, offset)], decided_by_manifest=decided)
        elif isinstance(item, ManifestSnapshot):
            result = self.assembler.add(item, offset=offset, now=READ_AT)
            self.done([(topic, released) for released in result.released])
            if result.complete is not None:
                plan = plan_manifest(self.view, ROUTING, result.complete, GUARD)
                self.execute(plan, [(topic, o) for o in result.complete.offsets])
        else:
            assert isinstance(item, HeldAction)
            plan = (
                release_held(self.view, AGENCY, BUILDING)
                if item is HeldAction.RELEASE
                else discard_held(self.view, ROUTING, AGENCY, BUILDING)
            )
            self.execute(plan, [(topic, offset)])
        return True

    def execute(
        self, plan: Plan, offsets: list[tuple[str, int]], *, decided_by_manifest: bool = False
    ) -> None:
        building_work = [w for w in self.works if not w.done and w.registered]
        deferred: list[BuildingRecord] = []
        queued: list[StateRecord] = []
        for record in plan.records:
            self.view.apply(record)
            if isinstance(record, BuildingRecord) and (plan.operations or building_work):
                deferred.append(record)
            elif isinstance(record.key, DocKey) and record.key in self.chains:
                queued.append(record)
            else:
                self.write(record)
        earlier = building_work if deferred or decided_by_manifest else []
        work = Work(offsets, deferred, earlier)
        work.registered = bool(deferred or plan.operations)
        for record in queued:
            self.chains[record.key].append(Entry(work, record=record))  # type: ignore[index]
            work.pending += 1
        for operation in plan.operations:
            if isinstance(operation, Upload):
                self.view.apply(intent_record(operation))
                self.uploads.setdefault(operation.key, []).append(operation)
            else:
                self.view.apply(deleted_record(operation))
            if operation.key not in self.chains:
                self.chains[operation.key] = deque()
                self.results.pop(operation.key, None)
            self.chains[operation.key].append(Entry(work, operation=operation))
            work.pending += 1
        for mark in plan.marks:  # OperationExecutor.mark
            self.view.apply(mark)
            uploads = self.uploads.get(mark.key)
            if mark.status is DocStatus.UPLOAD_HELD and mark.held_by and uploads:
                self.holding[mark.key] = (list(uploads), mark.held_by)
            else:
                self.holding.pop(mark.key, None)
        if work.pending == 0 and not deferred and not earlier:
            self.done(offsets)
            return
        self.works.append(work)
        self.progress()

    def progress(self) -> None:
        """Complete the works whose entries ended: their building record, then their offsets."""
        changed = True
        while changed:
            changed = False
            for work in self.works:
                if work.done or work.pending or not all(w.done for w in work.earlier):
                    continue
                for record in work.deferred:
                    self.write(record)
                work.done = changed = True
                self.done(work.offsets)
        self.works = [w for w in self.works if not w.done]

    # -- the partner work ---------------------------------------------------------------------
    def step(self, pick: int) -> bool:
        """Run one step of one document's chain (the ``pick``-th with work)."""
        if not self.chains:
            return False
        key = sorted(self.chains, key=lambda k: k.document_id)[pick % len(self.chains)]
        chain = self.chains[key]
        entry = chain[0]
        if entry.record is not None:
            self.write(entry.record)
        elif isinstance(entry.operation, Delete):
            self.run_delete(key, entry.operation)
            self.results[key] = None
        elif isinstance(entry.operation, Upload) and not self.run_upload(key, entry):
            return True  # sent; its result is recorded at its next step
        chain.popleft()
        if isinstance(entry.operation, Upload):
            for uploads in (self.uploads.get(key), self.holding.get(key, ([], ""))[0]):
                if uploads is not None and entry.operation in uploads:
                    uploads.remove(entry.operation)
            if not self.uploads.get(key, True):
                del self.uploads[key]
            if key in self.holding and not self.holding[key][0]:
                del self.holding[key]
        if not chain:
            del self.chains[key]
        entry.work.pending -= 1
        self.progress()
        return True

    def base(self, key: DocKey, operation: Upload | Delete) -> Remote | None:
        if key in self.results:
            return self.results[key]
        if operation.remote_id is None:
            return None
        sha = partner_sha256(operation) if isinstance(operation, Upload) else ""
        return Remote(operation.remote_id, sha)

    def held_by(self, upload: Upload) -> str | None:
        holding = self.holding.get(upload.key)
        if holding is None or not any(held is upload for held in holding[0]):
            return None
        return holding[1]

    def settle(self, key: DocKey, record: StateRecord) -> None:
        if len(self.chains[key]) == 1:  # nothing queued behind it
            self.view.apply(record)

    def run_delete(self, key: DocKey, delete: Delete) -> None:
        base = self.base(key, delete)
        if base is not None:
            self.partner.delete(base.remote_id)
        self.write(deleted_record(delete))
        self.settle(key, deleted_record(delete))

    def run_upload(self, key: DocKey, entry: Entry) -> bool:
        """One step of an upload: sent (False), or ended with its record written (True)."""
        upload = entry.operation
        assert isinstance(upload, Upload)
        sha = upload.document.content.sha256
        held_by = self.held_by(upload)
        base = self.base(key, upload)
        if entry.sent is None:
            if base is not None and base.sha256 == sha:
                if held_by is not None:
                    self.record(key, held_published_record(upload, base.remote_id, sha, held_by))
                self.results[key] = base
                return True
            if held_by is not None:  # a held manifest stopped it before it was sent
                remote_id = base.remote_id if base is not None else upload.remote_id
                self.record(key, held_upload_record(upload, held_by, remote_id))
                self.results[key] = base
                return True
            intent = intent_record(upload)
            if base is not None:
                intent = dataclasses.replace(intent, remote_id=base.remote_id)
            self.write(intent)
            remote_id = self.partner.upload(
                key.document_id, sha, base.remote_id if base is not None else None
            )
            entry.sent = Remote(remote_id, sha)
            return False
        sent = entry.sent
        self.write(published_record(upload, sent.remote_id, sha))
        if held_by is not None:
            self.record(key, held_published_record(upload, sent.remote_id, sha, held_by))
        else:
            self.settle(key, published_record(upload, sent.remote_id, sha))
        self.results[key] = sent
        return True

    def record(self, key: DocKey, record: StateRecord) -> None:
        self.write(record)
        self.settle(key, record)

    # -- the operator -------------------------------------------------------------------------
    def hold_shows(self) -> bool:
        """What ``chouette-relay held`` reads in the state topic: something waits."""
        durable = restored(self.changelog)
        building = durable.building(AGENCY, BUILDING)
        undecided = building is not None and building.held and building.held.decision is None
        return bool(undecided or durable.held(AGENCY, BUILDING))

    def idle(self) -> bool:
        return not self.chains and all(
            self.position[topic] >= len(items) for topic, items in self.inputs.items()
        )


def restored(changelog: list[StateRecord]) -> PublishedView:
    view = PublishedView()
    for record in changelog:
        view.apply(record)
    return view


# -- the property ---------------------------------------------------------------------------------


def run(history: History, schedule: list[tuple[str, int]], decision: HeldAction) -> Relay:
    partner = Partner()
    relay = Relay(history, partner)
    commands = relay.inputs[COMMANDS]
    for action, pick in schedule:
        if action == "read":
            relay.read((EVENTS, MANIFESTS, COMMANDS)[pick % 3])
        elif action == "step":
            relay.step(pick)
        elif action == "commit":  # the periodic commit: a crash reads again what came after
            relay.commit()
        elif action == "crash":
            relay.start()
        elif (
            action == "decide" and relay.hold_shows() and len(commands) == relay.position[COMMANDS]
        ):
            commands.append(decision)
    for _ in range(3):  # quiescence; the operator answers a hold that still shows
        while relay.read(EVENTS) or relay.read(MANIFESTS) or relay.read(COMMANDS) or relay.step(0):
            pass
        assert relay.idle()
        if not relay.hold_shows():
            break
        commands.append(decision)
    return relay


schedules = st.lists(
    st.tuples(
        st.sampled_from(["read", "read", "read", "step", "step", "commit", "crash", "decide"]),
        st.integers(min_value=0, max_value=30),
    ),
    max_size=60,
)


def check(history: History, schedule: list[tuple[str, int]], decision: HeldAction) -> None:
    relay = run(history, schedule, decision)
    building = relay.view.building(AGENCY, BUILDING)
    held = building.held if building is not None else None
    applied = building.manifest_taken_at.get(Module.AG) if building is not None else None
    note(f"building record: {building}")
    event(f"held, then {held.decision}" if held is not None else "not held")
    if decision is HeldAction.RELEASE:
        assert applied == max(history.listed)  # every manifest applied, the last one last
    assert relay.partner.references() == history.expected(applied)
    assert not relay.hold_shows()
    published = {
        r.key.document_id: r.sha256
        for r in restored(relay.changelog).with_status(DocStatus.PUBLISHED)
    }
    assert published == relay.partner.references()  # the state topic knows what the partner holds


@settings(max_examples=600, deadline=None)
@given(history=histories(), schedule=schedules)
def test_a_released_manifest_ends_the_building_as_if_applied_when_it_arrived(
    history: History, schedule: list[tuple[str, int]]
) -> None:
    check(history, schedule, HeldAction.RELEASE)


@settings(max_examples=600, deadline=None)
@given(history=histories(), schedule=schedules)
def test_a_discarded_manifest_ends_the_building_as_if_it_had_never_come(
    history: History, schedule: list[tuple[str, int]]
) -> None:
    check(history, schedule, HeldAction.DISCARD)
