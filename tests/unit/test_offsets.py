"""Offsets are committed only up to the lowest record whose work is not finished."""

from __future__ import annotations

import pytest

from consumer.core.offsets import OffsetTracker


def test_nothing_read_means_nothing_to_commit() -> None:
    assert OffsetTracker().committable() is None


def test_records_handled_in_full_commit_past_the_last_one_read() -> None:
    tracker = OffsetTracker()
    for offset in (5, 6, 9):  # gaps (compaction, transaction markers) are normal
        tracker.begin(offset)
        tracker.done(offset)
    assert tracker.committable() == 10


def test_the_lowest_unfinished_offset_holds_the_commit_back() -> None:
    tracker = OffsetTracker()
    for offset in (1, 2, 3):
        tracker.begin(offset)
    tracker.done(1)
    tracker.done(3)
    assert tracker.committable() == 2
    tracker.done(2)
    assert tracker.committable() == 4


def test_a_record_with_several_operations_is_done_when_all_are() -> None:
    tracker = OffsetTracker()
    tracker.begin(7)
    tracker.hold(7)
    tracker.hold(7)
    tracker.done(7)  # handled; two operations still running
    tracker.done(7)
    assert tracker.committable() == 7
    assert tracker.is_open(7)
    tracker.done(7)
    assert tracker.committable() == 8
    assert tracker.open_count == 0


def test_manifest_parts_stay_open_until_the_manifest_is_done() -> None:
    tracker = OffsetTracker()
    for part_offset in (10, 11, 12):
        tracker.begin(part_offset)  # parts wait in the assembler
    tracker.begin(13)
    tracker.done(13)
    assert tracker.committable() == 10
    for part_offset in (10, 11, 12):
        tracker.hold(part_offset)  # the complete manifest's operation
        tracker.done(part_offset)  # reading is over
    assert tracker.committable() == 10
    for part_offset in (10, 11, 12):
        tracker.done(part_offset)  # the partner acknowledged
    assert tracker.committable() == 14


def test_misuse_is_a_loud_bug_not_a_silent_commit() -> None:
    tracker = OffsetTracker()
    tracker.begin(3)
    with pytest.raises(ValueError, match="must increase"):
        tracker.begin(3)
    tracker.done(3)
    with pytest.raises(ValueError, match="not open"):
        tracker.done(3)
    with pytest.raises(ValueError, match="not open"):
        tracker.hold(3)
