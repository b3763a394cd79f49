"""The mass-deletion guard: a manifest must not wipe a building because LSC sent too little.

A truncated export or an empty snapshot looks exactly like a building whose documents were all
withdrawn. The guard tells them apart by size: withdrawals are held, not carried out, when they
would remove more than ``max_share`` of the building's published documents in the manifest's
modules *and* at least ``min_count`` documents (so that small buildings can still be tidied), or
whenever a manifest listing nothing at all would remove anything. A held manifest decides its
whole building: what it would withdraw (``delete_held``) or keep unpublished (``upload_held``)
waits until an operator releases or discards it, or a newer manifest replaces it
(``planning/manifests.py``, ``planning/actions.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from consumer.errors import ConfigError


@dataclass(frozen=True, slots=True)
class DeletionGuard:
    """Decides whether one manifest's withdrawals for one building are held."""

    max_share: float
    min_count: int

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_share <= 1.0:
            raise ConfigError(
                f"deletion guard max_share {self.max_share} must be between 0 and 1, e.g. 0.5"
            )
        if self.min_count < 0:
            raise ConfigError(f"deletion guard min_count {self.min_count} must be 0 or more")

    def holds(self, *, deleting: int, published: int, listed: int) -> bool:
        """Whether to hold ``deleting`` withdrawals.

        ``published`` counts the building's documents on the partner in the modules the manifest
        covers; ``listed`` counts the manifest's items in those modules.
        """
        if deleting <= 0:
            return False
        if listed == 0:
            return True
        return deleting >= self.min_count and deleting > self.max_share * published
