"""The event loop's lag: a step that holds the loop shows as a late tick, on the gauge and in the
histogram; the watcher ends when the relay stops."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from consumer.metrics import RelayMetrics
from consumer.ops.looplag import watch_loop_lag

INTERVAL_S = 0.05
BLOCKED_S = 0.4


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_a_blocked_loop_reports_a_tick_late_by_at_least_the_block() -> None:
    registry = CollectorRegistry()
    metrics = RelayMetrics.create(registry, version="test")
    stopping = asyncio.Event()
    watcher = asyncio.create_task(watch_loop_lag(metrics, stopping=stopping, interval_s=INTERVAL_S))
    await asyncio.sleep(0)  # the watcher takes its first due time

    time.sleep(BLOCKED_S)  # noqa: ASYNC251 - holding the loop is what is measured

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    while sample(registry, "chouette_relay_event_loop_tick_lag_seconds_count") == 0:
        assert loop.time() < deadline, "no tick observed"
        await asyncio.sleep(0)  # read the late tick before the next one, due an interval later
    # The tick was due at most one interval after the block began, and fired after it ended.
    lag = sample(registry, "chouette_relay_event_loop_lag_seconds")
    assert lag >= BLOCKED_S - INTERVAL_S
    late = sample(registry, "chouette_relay_event_loop_tick_lag_seconds_bucket", le="0.25")
    ticks = sample(registry, "chouette_relay_event_loop_tick_lag_seconds_count")
    assert ticks - late >= 1, "the late tick is not in the histogram's upper buckets"

    stopping.set()
    await asyncio.wait_for(watcher, timeout=10.0)
