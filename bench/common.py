"""What the Kafka benchmarks share: a measure, its line, the side-by-side verdict, the broker,
a process's resident memory."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from consumer.local.kafka import LocalKafka

EXTERNAL_BROKER_VARIABLE = "CHOUETTE_RELAY_TEST_KAFKA"
SCALE_VARIABLE = "BENCH_SCALE"  # `make bench QUICK=1` sets it to 0.1


def scale() -> float:
    """The share of its full sizes a benchmark runs at: ``$BENCH_SCALE``, else 1."""
    return float(os.environ.get(SCALE_VARIABLE, "1"))


@dataclass(frozen=True)
class Measure:
    records: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.records / self.seconds


def show(label: str, measure: Measure) -> None:
    print(
        f"{label:<30}{measure.records:>9,} records {measure.seconds:6.2f} s "
        f"{measure.per_second:>10,.0f} records/s",
        flush=True,
    )


def report(
    *,
    rounds: int,
    bare: Sequence[Measure],
    relay: Sequence[Measure],
    floor: Sequence[Measure],
    target: float,
) -> None:
    """Best of each side, and the relay's ratio to the bare consumer against ``target``."""
    best_bare = max(m.per_second for m in bare)
    best_relay = max(m.per_second for m in relay)
    best_floor = max(m.per_second for m in floor)
    ratio = best_relay / best_bare
    verdict = "met" if ratio >= target else "NOT met"
    print(
        f"best of {rounds}: (a) {best_bare:,.0f} records/s, (b) {best_relay:,.0f} records/s, "
        f"(c) {best_floor:,.0f} records/s"
    )
    print(
        f"ratio (b)/(a) = {ratio:.2f} (target >= {target}: {verdict}); "
        f"(c)/(a) = {best_floor / best_bare:.2f} is the most (b) could reach"
    )


def rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of process ``pid`` in bytes: its resident memory now, and at its peak."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def cpu_seconds(pid: int) -> float:
    """CPU time process ``pid`` has spent so far (user and system), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(names)
    finally:
        await admin.close()


def on_a_broker(run: Callable[[str], Coroutine[Any, Any, None]]) -> None:
    """Run ``run(bootstrap)`` on ``$CHOUETTE_RELAY_TEST_KAFKA``, or on a local broker of its own."""
    external = os.environ.get(EXTERNAL_BROKER_VARIABLE, "").strip()
    if external:
        asyncio.run(run(external))
        return
    with LocalKafka() as kafka:
        asyncio.run(run(kafka.bootstrap_servers))
