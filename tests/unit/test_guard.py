"""The mass-deletion guard: a truncated or empty manifest must not wipe a building."""

from __future__ import annotations

import pytest

from consumer.core.guard import DeletionGuard
from consumer.errors import ConfigError

GUARD = DeletionGuard(max_share=0.5, min_count=10)


def test_ordinary_withdrawals_go_through() -> None:
    assert not GUARD.holds(deleting=3, published=100, listed=97)
    assert not GUARD.holds(deleting=0, published=100, listed=0)


def test_withdrawing_more_than_the_share_and_at_least_min_count_is_held() -> None:
    assert GUARD.holds(deleting=51, published=100, listed=49)
    assert not GUARD.holds(deleting=50, published=100, listed=50)  # exactly the share is allowed


def test_small_buildings_can_still_be_tidied() -> None:
    # 9 of 10 is far above the share, but below min_count: a real clean-up, not a wipe
    assert not GUARD.holds(deleting=9, published=10, listed=1)


def test_an_empty_manifest_that_would_delete_anything_is_held() -> None:
    assert GUARD.holds(deleting=1, published=1, listed=0)
    assert GUARD.holds(deleting=1, published=100, listed=0)


def test_min_count_zero_guards_on_share_alone() -> None:
    guard = DeletionGuard(max_share=0.2, min_count=0)
    assert guard.holds(deleting=3, published=10, listed=7)
    assert not guard.holds(deleting=2, published=10, listed=8)


@pytest.mark.parametrize(("share", "count"), [(-0.1, 1), (1.5, 1), (0.5, -1)])
def test_nonsense_settings_are_refused_at_start_up(share: float, count: int) -> None:
    with pytest.raises(ConfigError):
        DeletionGuard(max_share=share, min_count=count)
