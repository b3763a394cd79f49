"""How late the event loop runs: a periodic tick that measures how much later than due it fires.

Everything in the relay shares one event loop, so a step that holds it (a large record decoded in
one go, a plan computed for a huge building) delays every timer, probe, heartbeat and answer by as
long. The watcher asks to wake every ``interval_s`` and exports how late each wake-up came, so such
a step shows on the dashboard and pages when it lasts.
"""

from __future__ import annotations

import asyncio

from consumer.metrics import RelayMetrics

TICK_INTERVAL_S = 0.5


async def watch_loop_lag(
    metrics: RelayMetrics, *, stopping: asyncio.Event, interval_s: float = TICK_INTERVAL_S
) -> None:
    """Tick every ``interval_s`` until ``stopping`` is set, exporting each tick's lateness.

    A tick that fires on time reports about zero; one that was due while something held the loop
    reports how long after its due time it ran.
    """
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval_s
        try:
            async with asyncio.timeout_at(due):
                await stopping.wait()
        except TimeoutError:
            lag = max(0.0, loop.time() - due)
            metrics.event_loop_lag.set(lag)
            metrics.event_loop_tick_lag.observe(lag)
        else:
            return
