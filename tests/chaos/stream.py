"""The chaos test's stream: a seeded mix of LSC's records, its mistakes, faults and restarts.

``chaos_stream(seed, ...)`` lists, in the order the test carries them out, the records LSC
publishes (documents created and changed, documents unpublished and left out of later manifests,
multi-part manifests whose parts arrive late or twice, events published twice, a snapshot id two
buildings share), the bad records of ``tests.chaos.poison`` between them, partner and document
store faults switched on and off, and relay restarts (SIGTERM and SIGKILL). It ends with a
complete manifest of every building, so the partner must then hold LSC's truth as the relay's
routing (the core's own ``RoutingTable.decide``) forwards it, and park what routing parks.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import random
import signal
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

from consumer.core.events import Document
from consumer.core.routing import Action, RoutingTable
from tests.chaos.lsc import MODULES, Lsc, Place, Publish, Serve, manifest_record
from tests.chaos.poison import MAKERS, orphan_part


@dataclass(frozen=True, slots=True)
class PartnerFaults:
    """``sandbox.set_faults(**change)``; an empty change clears every fault."""

    change: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class SlowContent:
    """The document store sends the body of ``name`` slowly (a chunk per ``delay_s``)."""

    name: str
    delay_s: float


@dataclass(frozen=True, slots=True)
class Restart:
    """Stop the relay with ``signal`` and start a new one."""

    signal: signal.Signals


Step = Publish | PartnerFaults | SlowContent | Restart

PARTNER_FAULTS: tuple[Mapping[str, float], ...] = (
    {"error_rate": 0.3},
    {"latency_ms": 40.0},
    {"outage_seconds": 1.5},
    {"storm_seconds": 1.5, "storm_retry_after_s": 1},
    {},
)


@dataclass
class ChaosStream:
    seed: int
    steps: list[Step]
    expected: dict[tuple[str, str], str]  # (condominium, document id) -> sha256 on the partner
    parked: dict[tuple[str, str, str], str]  # (agency, building, document id) -> parked reason
    lsc: Lsc  # LSC as the stream leaves it, to go on from

    @property
    def records(self) -> list[Publish]:
        return [step for step in self.steps if isinstance(step, Publish)]

    @property
    def poison(self) -> list[Publish]:
        return [record for record in self.records if record.reason is not None]

    def summary(self) -> str:
        reasons = Counter(record.reason for record in self.poison)
        restarts = Counter(step.signal.name for step in self.steps if isinstance(step, Restart))
        return (
            f"{len(self.records)} records ({len(self.poison)} poison: {dict(reasons)}), "
            f"restarts {dict(restarts)}, {len(self.expected)} documents expected on the partner, "
            f"{len(self.parked)} parked"
        )


@dataclass
class _Builder:
    rng: random.Random
    lsc: Lsc
    places: Sequence[Place]
    quiet: Place  # a building LSC publishes nothing valid for: only orphan parts
    partition_of: Callable[[bytes], int]
    groups: list[list[Step]] = field(default_factory=list)
    delayed: defaultdict[int, list[Step]] = field(default_factory=lambda: defaultdict(list))
    busy_until: dict[Place, int] = field(default_factory=dict)  # parts of a snapshot still due
    events: list[Publish] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)
    unpublished: Counter[Place] = field(default_factory=Counter)
    round: int = 0

    def create(self) -> None:
        place = self.rng.choice(self.places)
        self._event(self.lsc.publish_document(place, self.lsc.new_document(place)))

    def change(self) -> None:
        place = self.rng.choice(self.places)
        document = self.rng.choice(list(self.lsc.truth[place].values()))
        changes = {}
        if document["audience"] != "individual" and self.rng.random() < 0.15:
            changes["audience"] = "individual"  # for good: never forwarded again
        self._event(self.lsc.publish_document(place, self.lsc.version_of(document, **changes)))

    def unpublish(self) -> None:
        place = self.rng.choice(self.places)
        truth = self.lsc.truth[place]
        if len(truth) > 3 and self.unpublished[place] < 4:  # far from the mass-deletion guard
            del truth[self.rng.choice(sorted(truth))]
            self.unpublished[place] += 1
            self.lsc.tick()

    def duplicate(self) -> None:
        if self.events:
            again = self.rng.choice(self.events)
            self.groups.append([dataclasses.replace(again, what=f"again: {again.what}")])

    def manifest(self, place: Place | None = None, *, modules: Sequence[str] = ()) -> None:
        place = place or self.rng.choice(self.places)
        if self.busy_until.get(place, -1) >= self.round:
            return  # the parts of its last snapshot are still on their way
        if not modules:
            modules = MODULES if self.rng.random() < 0.5 else self._some_modules()
        items = self.lsc.listing(place, modules)
        if not items:  # an empty listing would be held by the mass-deletion guard
            modules, items = MODULES, self.lsc.listing(place, MODULES)
        parts = self.lsc.snapshot(
            place, items, modules=modules, taken_at=self.lsc.tick(), parts=self.rng.randint(1, 3)
        )
        self._send_parts(place, [manifest_record(p, what=f"manifest of {place[1]}") for p in parts])

    def shared_snapshot_id(self) -> None:
        """Two buildings of one partition publish snapshots with the same id, interleaved."""
        by_partition: defaultdict[int, list[Place]] = defaultdict(list)
        for place in self.places:
            if self.busy_until.get(place, -1) < self.round and self.lsc.truth[place]:
                by_partition[self.partition_of(f"{place[0]}:{place[1]}".encode())].append(place)
        pairs = [places for places in by_partition.values() if len(places) >= 2]
        if not pairs:
            return
        first, second = self.rng.sample(self.rng.choice(pairs), 2)
        shared, taken_at = self.lsc.uuid(), self.lsc.tick()
        a, b = (
            self.lsc.snapshot(
                p,
                self.lsc.listing(p, MODULES),
                modules=MODULES,
                taken_at=taken_at,
                parts=2,
                snapshot_id=shared,
            )
            for p in (first, second)
        )
        what = f"snapshot id shared by {first[1]} and {second[1]}"
        self.groups.append([manifest_record(part, what=what) for part in (*a[:1], *b[:1])])
        self.groups.append([manifest_record(part, what=what) for part in (*a[1:], *b[1:])])

    def poison(self, maker: Callable[[Lsc, Place], list[Publish]]) -> None:
        if maker is orphan_part and self.rng.random() < 0.5:
            place = self.quiet  # nothing else will ever supersede it: only the expiry ends it
        else:
            place = self.rng.choice(
                [p for p in self.places if self.busy_until.get(p, -1) < self.round]
            )
        self.groups.append(list(maker(self.lsc, place)))

    def partner_faults(self) -> None:
        self.groups.append([PartnerFaults(self.rng.choice(PARTNER_FAULTS))])

    def slow_content(self) -> None:
        if self.stored:
            self.groups.append([SlowContent(self.rng.choice(self.stored), 0.2)])

    def _some_modules(self) -> list[str]:
        return self.rng.sample(MODULES, self.rng.randint(1, len(MODULES) - 1))

    def _event(self, record: Publish) -> None:
        self.events.append(record)
        self.groups.append([record])

    def _send_parts(self, place: Place, records: list[Publish]) -> None:
        if len(records) > 1 and self.rng.random() < 0.3:
            twice = self.rng.randrange(len(records))
            records.insert(twice, records[twice])  # delivered twice, one after the other
        now: list[Step] = [*records[:1]]
        later = records[1:]
        self.groups.append(now)
        if later:
            due = self.round + self.rng.randint(0, 3)
            self.delayed[due].extend(later)
            self.busy_until[place] = due


def chaos_stream(
    seed: int,
    *,
    places: Sequence[Place],
    quiet: Place,
    routing: RoutingTable,
    serve: Serve,
    partition_of: Callable[[bytes], int],
    start: dt.datetime,
    now: dt.datetime,
    rounds: int = 200,
    restarts: int = 4,
) -> ChaosStream:
    """The stream of ``seed``; ``serve`` stores a document's bytes and returns its URL. LSC's
    history starts at ``start``; ``now`` is the relay's clock, which some bad records are beyond."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible stream, not a secret
    stored: list[str] = []

    def serve_and_note(name: str, data: bytes) -> str:
        stored.append(name)
        return serve(name, data)

    lsc = Lsc(rng, places=[*places, quiet], serve=serve_and_note, start=start)
    lsc.now = now
    builder = _Builder(rng, lsc, places, quiet, partition_of, stored=stored)
    for place in places:
        for _ in range(rng.randint(3, 5)):
            builder._event(lsc.publish_document(place, lsc.new_document(place)))
    poison = [*MAKERS, *rng.choices(MAKERS, k=10)]
    scheduled: dict[int, Callable[[], None]] = {}
    for round_, maker in zip(rng.sample(range(rounds), len(poison)), poison, strict=True):
        scheduled[round_] = functools.partial(builder.poison, maker)
    for round_ in rng.sample(sorted(set(range(rounds)) - set(scheduled)), 2):
        scheduled[round_] = builder.shared_snapshot_id
    signals = [signal.SIGTERM, signal.SIGKILL]
    signals += rng.choices(signals, k=max(0, restarts - 2))
    rng.shuffle(signals)
    restart_at = dict(zip(rng.sample(range(5, rounds), restarts), signals, strict=True))
    actions = (
        builder.create,
        builder.change,
        builder.unpublish,
        builder.manifest,
        builder.duplicate,
        builder.partner_faults,
        builder.slow_content,
    )
    weights = (30, 12, 5, 10, 8, 4, 2)
    for builder.round in range(rounds):
        builder.groups.append(builder.delayed.pop(builder.round, []))
        if builder.round in restart_at:
            builder.groups.append([Restart(restart_at[builder.round])])
        action = scheduled.get(builder.round) or rng.choices(actions, weights)[0]
        action()
    for round_ in sorted(builder.delayed):
        builder.groups.append(builder.delayed.pop(round_))
    builder.groups.append([PartnerFaults({})])
    builder.busy_until.clear()
    for place in places:  # the final manifests: every building, every module, complete
        builder.manifest(place, modules=MODULES)
    for round_ in sorted(builder.delayed):
        builder.groups.append(builder.delayed.pop(round_))
    for _ in range(rng.randint(0, 3)):  # and a few documents after them
        builder.create()
    expected, parked = _outcome(lsc, places, routing)
    steps = [step for group in builder.groups for step in group]
    return ChaosStream(seed, steps, expected, parked, lsc)


def _outcome(
    lsc: Lsc, places: Sequence[Place], routing: RoutingTable
) -> tuple[dict[tuple[str, str], str], dict[tuple[str, str, str], str]]:
    """What LSC's truth becomes through the relay's routing: forwarded, or parked and why."""
    expected: dict[tuple[str, str], str] = {}
    parked: dict[tuple[str, str, str], str] = {}
    for agency, building in places:
        for document_id, document in lsc.truth[(agency, building)].items():
            verdict = routing.decide(agency, building, msgspec.convert(document, type=Document))
            if verdict.action is Action.FORWARD:
                assert verdict.condominium_id is not None
                expected[(verdict.condominium_id, document_id)] = document["content"]["sha256"]
            elif verdict.action is Action.PARK:
                parked[(agency, building, document_id)] = str(verdict.reason)
    return expected, parked
