"""The garbage collector's policy for a long-running relay.

Reference counting frees almost everything the relay makes (records, futures, plans); the cyclic
collector only finds the rare cycle. CPython's default thresholds run a full collection, which
walks every tracked object of the process, every 100 young collections or so: with a restored view
and a backlog in memory that is most of the CPU of ingest (about 20 us an event at 100,000 events,
``make bench``). The relay collects its oldest generation ten times less often, and moves what a
restore built (a view lives as long as its partition) out of the collector's sight.
"""

from __future__ import annotations

import gc

# Young collections as CPython has them; the middle and oldest generations less often.
THRESHOLDS = (700, 20, 100)


def tune_collector() -> None:
    """Set the relay's thresholds (a process-wide setting: called once, at start)."""
    gc.set_threshold(*THRESHOLDS)


def keep_restored() -> None:
    """After a restore: what exists now is long-lived, and no full collection walks it again.

    Collected first, so that no garbage cycle of the moment is kept for good (a frozen object is
    freed by its reference count only); what was frozen before is not walked again.
    """
    gc.collect()
    gc.freeze()
