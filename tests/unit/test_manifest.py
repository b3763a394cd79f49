"""Manifest assembly: act only on complete snapshots, and give every offset back exactly once."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Sequence

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.core.events import Document, ManifestSnapshot, Module
from consumer.core.manifest import AssemblyOutcome, AssemblyResult, ManifestAssembler

NOW = dt.datetime(2024, 6, 1, 12, 0, tzinfo=dt.UTC)
OLD, NEW = str(uuid.UUID(int=1)), str(uuid.UUID(int=2))


def item(document_id: str, module: str = "ag") -> dict[str, object]:
    return {
        "id": document_id,
        "module": module,
        "category": "PV",
        "title": document_id,
        "document_date": "2024-05-01",
        "audience": "building",
        "content": {
            "media_type": "application/pdf",
            "size_bytes": 100,
            "sha256": hashlib.sha256(document_id.encode()).hexdigest(),
            "url": f"https://documents.lsc.example/{document_id}.pdf",
        },
    }


def part(
    number: int,
    parts: int,
    ids: Sequence[str],
    *,
    snapshot_id: str = NEW,
    item_count: int | None = None,
    taken_at: str = "2024-06-01T10:00:00Z",
    modules: Sequence[str] = ("ag",),
    building: str = "bat-12",
) -> ManifestSnapshot:
    return msgspec.convert(
        {
            "schema_version": 1,
            "event_type": "manifest-snapshot",
            "snapshot_id": snapshot_id,
            "taken_at": taken_at,
            "agency_id": "agence-lyon",
            "building_id": building,
            "modules": list(modules),
            "part": number,
            "parts": parts,
            "item_count": len(ids) if item_count is None else item_count,
            "items": [item(i, modules[0]) for i in ids],
        },
        type=ManifestSnapshot,
    )


def assembler(max_pending_items: int = 1000) -> ManifestAssembler:
    return ManifestAssembler(expiry=dt.timedelta(minutes=30), max_pending_items=max_pending_items)


def ids_of(items: Sequence[Document]) -> list[str]:
    return [document.id for document in items]


def test_a_single_part_snapshot_is_complete_at_once() -> None:
    result = assembler().add(part(1, 1, ["a", "b"]), offset=4, now=NOW)
    assert result.outcome is AssemblyOutcome.COMPLETE
    assert result.complete is not None
    assert ids_of(result.complete.items) == ["a", "b"]
    assert result.complete.offsets == (4,)
    assert result.complete.modules == {Module.AG}
    assert result.released == []


def test_parts_in_any_order_complete_with_items_in_part_order() -> None:
    gatherer = assembler()
    first = gatherer.add(part(3, 3, ["e"], item_count=5), offset=10, now=NOW)
    second = gatherer.add(part(1, 3, ["a", "b"], item_count=5), offset=11, now=NOW)
    assert (first.outcome, second.outcome) == (AssemblyOutcome.PENDING,) * 2
    assert gatherer.pending_offsets() == [10, 11]
    last = gatherer.add(part(2, 3, ["c", "d"], item_count=5), offset=12, now=NOW)
    assert last.complete is not None
    assert ids_of(last.complete.items) == ["a", "b", "c", "d", "e"]
    assert last.complete.offsets == (10, 11, 12)
    assert gatherer.pending_offsets() == []


def test_a_duplicate_part_is_released_and_changes_nothing() -> None:
    gatherer = assembler()
    gatherer.add(part(1, 2, ["a"], item_count=2), offset=1, now=NOW)
    again = gatherer.add(part(1, 2, ["a"], item_count=2), offset=2, now=NOW)
    assert (again.outcome, again.released) == (AssemblyOutcome.DUPLICATE, [2])
    done = gatherer.add(part(2, 2, ["b"], item_count=2), offset=3, now=NOW)
    assert done.complete is not None
    assert done.complete.offsets == (1, 3)


def test_a_part_of_a_snapshot_already_complete_is_a_duplicate() -> None:
    gatherer = assembler()
    gatherer.add(part(1, 1, ["a"]), offset=1, now=NOW)
    again = gatherer.add(part(1, 1, ["a"]), offset=2, now=NOW)
    assert (again.outcome, again.released, again.complete) == (
        AssemblyOutcome.DUPLICATE,
        [2],
        None,
    )


@pytest.mark.parametrize(
    ("parts", "outcome_at"),
    [
        ([part(1, 2, ["a"], item_count=3), part(2, 2, ["b"], item_count=3)], 1),  # too few
        ([part(1, 2, ["a", "b"], item_count=1), part(2, 2, ["c"], item_count=1)], 0),  # too many
    ],
)
def test_an_item_count_mismatch_drops_the_snapshot(
    parts: list[ManifestSnapshot], outcome_at: int
) -> None:
    gatherer = assembler()
    results = [gatherer.add(p, offset=n, now=NOW) for n, p in enumerate(parts[: outcome_at + 1])]
    dropped = results[-1]
    assert dropped.outcome is AssemblyOutcome.INVALID_COUNT
    assert dropped.complete is None
    assert sorted(dropped.released) == list(range(outcome_at + 1))
    assert [d.reason for d in dropped.dropped] == [AssemblyOutcome.INVALID_COUNT]
    assert gatherer.pending_snapshots == 0


def test_parts_that_disagree_drop_the_snapshot() -> None:
    gatherer = assembler()
    gatherer.add(part(1, 2, ["a"], item_count=2), offset=1, now=NOW)
    other = gatherer.add(
        part(2, 2, ["b"], item_count=2, taken_at="2024-06-01T11:00:00Z"), offset=2, now=NOW
    )
    assert other.outcome is AssemblyOutcome.INCONSISTENT
    assert sorted(other.released) == [1, 2]
    numbering = gatherer.add(part(3, 2, ["c"]), offset=3, now=NOW)
    assert (numbering.outcome, numbering.released) == (AssemblyOutcome.INCONSISTENT, [3])


def test_a_newer_snapshot_supersedes_an_older_incomplete_one() -> None:
    gatherer = assembler()
    gatherer.add(part(1, 2, ["a"], snapshot_id=OLD, item_count=2), offset=1, now=NOW)
    newer = gatherer.add(
        part(1, 1, ["a", "b"], snapshot_id=NEW, taken_at="2024-06-01T11:00:00Z"), offset=2, now=NOW
    )
    assert newer.outcome is AssemblyOutcome.COMPLETE
    assert newer.released == [1]
    assert [(d.snapshot_id, d.reason) for d in newer.dropped] == [(OLD, AssemblyOutcome.SUPERSEDED)]
    late = gatherer.add(part(2, 2, ["b"], snapshot_id=OLD, item_count=2), offset=3, now=NOW)
    assert (late.outcome, late.released) == (AssemblyOutcome.SUPERSEDED, [3])


def test_a_part_of_a_snapshot_older_than_a_pending_one_is_superseded() -> None:
    gatherer = assembler()
    gatherer.add(
        part(1, 2, ["a"], item_count=2, taken_at="2024-06-01T11:00:00Z"), offset=1, now=NOW
    )
    older = gatherer.add(part(1, 1, ["a"], snapshot_id=OLD), offset=2, now=NOW)
    assert (older.outcome, older.released) == (AssemblyOutcome.SUPERSEDED, [2])


def test_only_a_snapshot_covering_the_same_modules_supersedes() -> None:
    gatherer = assembler()
    gatherer.add(
        part(1, 2, ["a"], snapshot_id=OLD, item_count=2, modules=["ag", "contrats"]),
        offset=1,
        now=NOW,
    )
    narrower = gatherer.add(
        part(1, 1, ["x"], snapshot_id=NEW, taken_at="2024-06-01T11:00:00Z"), offset=2, now=NOW
    )
    assert narrower.outcome is AssemblyOutcome.COMPLETE
    assert narrower.released == []
    finished = gatherer.add(
        part(2, 2, ["b"], snapshot_id=OLD, item_count=2, modules=["ag", "contrats"]),
        offset=3,
        now=NOW,
    )
    assert finished.complete is not None  # the planner ignores its stale module


def test_other_buildings_are_independent() -> None:
    gatherer = assembler()
    gatherer.add(part(1, 2, ["a"], snapshot_id=OLD, item_count=2), offset=1, now=NOW)
    other = gatherer.add(
        part(1, 1, ["a"], taken_at="2024-06-01T11:00:00Z", building="bat-13"), offset=2, now=NOW
    )
    assert other.released == []
    assert gatherer.pending_offsets() == [1]


def test_incomplete_snapshots_expire_by_the_arrival_of_their_first_part() -> None:
    gatherer = assembler()
    gatherer.add(part(1, 2, ["a"], snapshot_id=OLD, item_count=2), offset=1, now=NOW)
    gatherer.add(
        part(1, 2, ["b"], item_count=2, building="bat-13"),
        offset=2,
        now=NOW + dt.timedelta(minutes=20),
    )
    assert gatherer.expire(NOW + dt.timedelta(minutes=29)) == []
    expired = gatherer.expire(NOW + dt.timedelta(minutes=30))
    assert [(e.snapshot_id, e.offsets, e.reason) for e in expired] == [
        (OLD, (1,), AssemblyOutcome.EXPIRED)
    ]
    assert (expired[0].parts_received, expired[0].parts) == (1, 2)
    assert gatherer.pending_offsets() == [2]


def test_the_oldest_pending_snapshot_is_evicted_beyond_the_item_budget() -> None:
    gatherer = assembler(max_pending_items=3)
    gatherer.add(part(1, 2, ["a", "b"], snapshot_id=OLD, item_count=3), offset=1, now=NOW)
    result = gatherer.add(
        part(1, 2, ["c", "d"], item_count=3, building="bat-13"), offset=2, now=NOW
    )
    assert result.outcome is AssemblyOutcome.PENDING
    assert result.released == [1]
    assert [(d.snapshot_id, d.reason) for d in result.dropped] == [(OLD, AssemblyOutcome.EVICTED)]
    assert gatherer.pending_items == 2


def test_a_snapshot_declaring_more_items_than_the_budget_is_refused_and_evicts_nobody() -> None:
    gatherer = assembler(max_pending_items=3)
    waiting = part(1, 2, ["x"], snapshot_id=OLD, item_count=2, building="bat-13")
    gatherer.add(waiting, offset=1, now=NOW)
    for offset, number in ((2, 1), (3, 2)):
        result: AssemblyResult = gatherer.add(
            part(number, 2, ["a", "b"], item_count=4), offset=offset, now=NOW
        )
        assert (result.outcome, result.released, result.dropped) == (
            AssemblyOutcome.TOO_LARGE,
            [offset],
            [],
        )
    assert gatherer.pending_offsets() == [1]  # the other building's snapshot still waits


def test_a_part_read_again_with_other_items_drops_the_snapshot() -> None:
    gatherer = assembler()
    gatherer.add(part(1, 2, ["a"], item_count=2), offset=1, now=NOW)
    other = gatherer.add(part(1, 2, ["z"], item_count=2), offset=2, now=NOW)
    assert (other.outcome, sorted(other.released)) == (AssemblyOutcome.INCONSISTENT, [1, 2])
    assert gatherer.pending_snapshots == 0


def test_an_abandoned_snapshot_lets_its_parts_go_and_turns_later_ones_away() -> None:
    gatherer = assembler()
    gatherer.add(part(1, 3, ["a"], item_count=3), offset=1, now=NOW)
    gatherer.add(
        part(1, 2, ["x"], snapshot_id=OLD, item_count=2, building="bat-13"), offset=2, now=NOW
    )
    abandoned = gatherer.abandon(("agence-lyon", "bat-12", NEW), now=NOW)
    assert abandoned.released == [1]
    assert [(d.snapshot_id, d.reason) for d in abandoned.dropped] == [
        (NEW, AssemblyOutcome.ABANDONED)
    ]
    late = gatherer.add(part(3, 3, ["c"], item_count=3), offset=4, now=NOW)
    assert (late.outcome, late.released) == (AssemblyOutcome.ABANDONED, [4])
    assert gatherer.pending_offsets() == [2]  # another building's snapshot is left alone
    gatherer.expire(NOW + dt.timedelta(minutes=30))
    again = gatherer.add(part(1, 1, ["a"], taken_at="2024-06-01T10:30:00Z"), offset=5, now=NOW)
    assert again.outcome is AssemblyOutcome.COMPLETE  # forgotten after the expiry


def test_an_id_used_again_for_a_newer_snapshot_of_the_building_is_no_duplicate() -> None:
    gatherer = assembler()
    gatherer.add(part(1, 1, ["a"]), offset=1, now=NOW)
    again = gatherer.add(part(1, 1, ["a"]), offset=2, now=NOW)
    assert again.outcome is AssemblyOutcome.DUPLICATE
    reused = gatherer.add(part(1, 1, ["b"], taken_at="2024-06-01T11:00:00Z"), offset=3, now=NOW)
    assert reused.complete is not None
    assert ids_of(reused.complete.items) == ["b"]


def test_one_snapshot_id_for_two_buildings_is_two_snapshots() -> None:
    gatherer = assembler()
    results = [
        gatherer.add(part(1, 2, ["a1"], item_count=2), offset=1, now=NOW),
        gatherer.add(part(1, 2, ["b1"], item_count=2, building="bat-13"), offset=2, now=NOW),
        gatherer.add(part(2, 2, ["a2"], item_count=2), offset=3, now=NOW),
        gatherer.add(part(2, 2, ["b2"], item_count=2, building="bat-13"), offset=4, now=NOW),
    ]
    complete = [r.complete for r in results if r.complete is not None]
    assert [(c.building_id, ids_of(c.items), c.offsets) for c in complete] == [
        ("bat-12", ["a1", "a2"], (1, 3)),
        ("bat-13", ["b1", "b2"], (2, 4)),
    ]
    assert all(r.released == [] for r in results)


@st.composite
def _interleaved_snapshots(draw: st.DrawFn) -> list[ManifestSnapshot]:
    """One snapshot per building, ids drawn from a pool of two, parts in any order."""
    parts_of_all: list[ManifestSnapshot] = []
    for building in draw(st.lists(st.sampled_from(BUILDINGS), min_size=1, max_size=4, unique=True)):
        snapshot_id = draw(st.sampled_from([OLD, NEW]))
        parts = draw(st.integers(min_value=1, max_value=3))
        ids = [
            [f"{building}-{n}-{i}" for i in range(draw(st.integers(0, 2)))] for n in range(parts)
        ]
        total = sum(len(chunk) for chunk in ids)
        parts_of_all += [
            part(n + 1, parts, chunk, snapshot_id=snapshot_id, item_count=total, building=building)
            for n, chunk in enumerate(ids)
        ]
    return draw(st.permutations(parts_of_all))


BUILDINGS = ["bat-1", "bat-2", "bat-3", "bat-4"]


@given(_interleaved_snapshots())
def test_every_building_completes_its_own_snapshot_whatever_ids_other_buildings_use(
    parts: list[ManifestSnapshot],
) -> None:
    gatherer = assembler()
    completed: dict[str, list[str]] = {}
    returned: list[int] = []
    for offset, snapshot_part in enumerate(parts):
        result = gatherer.add(snapshot_part, offset=offset, now=NOW)
        assert result.dropped == []
        returned += result.released
        if result.complete is not None:
            assert result.complete.building_id not in completed
            completed[result.complete.building_id] = ids_of(result.complete.items)
            returned += result.complete.offsets
    expected = {
        p.building_id: sorted(
            d.id for q in parts if q.building_id == p.building_id for d in q.items
        )
        for p in parts
    }
    assert {building: sorted(ids) for building, ids in completed.items()} == expected
    assert sorted(returned) == list(range(len(parts)))
    assert gatherer.pending_snapshots == 0
