"""The chaos test's harness: the relay in a child process, restarted as the stream says.

``ChaosRun`` starts ``chouette-relay run`` with the test world's settings, publishes the stream's
records (remembering where each landed, to match dead letters to them), stops the relay with
SIGTERM (and checks it drains and exits 0) or SIGKILL, and starts it again; ``carry_out`` runs a
``ChaosStream`` through it, and ``partner_side`` adds issue #7's partner-side cases once it
converged.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from consumer.local.pdf import make_pdf
from consumer.local.sandbox import Answer, Faults, Scripted
from tests.chaos.lsc import DOCUMENTS, MODULES, Publish, document_record, manifest_record
from tests.chaos.stream import ChaosStream, PartnerFaults, Restart, SlowContent
from tests.fixtures.relay import RelayWorld

DRAIN_TIMEOUT_S = 5.0  # the harness's drain timeout
EXIT_MARGIN_S = 15.0  # leaving the group and closing the clients after the drain
NOTABLE = (
    "effective settings",
    "upload intents reconciled",
    "incomplete manifest expired",
    "manifest snapshot dropped",
    "stopped cleanly",
)


class ChaosRun:
    """The relay under test, as a child process started again after every restart."""

    def __init__(self, world: RelayWorld, log_path: Path, overrides: dict[str, Any]) -> None:
        self.world = world
        self.log_path = log_path
        self.overrides = overrides
        self.sent: dict[tuple[str, int, int], Publish] = {}
        self.process = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        self._runs_before = len(self._ops_ports())
        return self.world.spawn_relay(self.log_path, **self.overrides)

    def _ops_ports(self) -> list[int]:
        """The ops port of every relay started so far, in order (each logs it once up)."""
        return [e["port"] for e in self.log_entries() if e.get("msg") == "ops server listening"]

    async def publish(self, record: Publish) -> None:
        world = self.world
        topic = world.documents_topic if record.topic == DOCUMENTS else world.manifests_topic
        producer = await world.producer()
        sent = await producer.send_and_wait(
            topic,
            key=record.key,
            value=record.value,
            headers=list(record.headers),
            timestamp_ms=record.timestamp_ms,
        )
        self.sent[(topic, sent.partition, sent.offset)] = record

    async def restart(self, signum: signal.Signals, *, pause: float, while_starting: bool) -> None:
        """Stop the relay ``pause`` seconds after it serves (SIGKILL: maybe while it starts)."""
        if signum is signal.SIGTERM or not while_starting:
            # A SIGTERM before the relay handles signals is the default death, a SIGKILL in all
            # but name: wait until it serves, so that this restart goes through the drain.
            await self.world.wait_until(
                lambda: len(self._ops_ports()) > self._runs_before,
                timeout=60,
                what="the relay up before its restart",
            )
        await asyncio.sleep(pause)  # a random moment of the relay's work, not a wait for it
        if signum is signal.SIGKILL:
            self.world.kill(self.process)
        else:
            await self.stop()
        self.process = self._spawn()

    async def stop(self) -> None:
        """SIGTERM, then the exit, polled: the sandbox the drain talks to runs on this loop."""
        process = self.process
        process.send_signal(signal.SIGTERM)
        await self.world.wait_until(
            lambda: process.poll() is not None,
            timeout=DRAIN_TIMEOUT_S + EXIT_MARGIN_S,
            what="the relay's exit after SIGTERM",
        )
        assert process.returncode == 0, f"SIGTERM: exit code {process.returncode}"

    def log_entries(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        if not self.log_path.exists():
            return entries
        for line in self.log_path.read_bytes().splitlines():
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a line cut short by SIGKILL, or the JVM-free child's stray output
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def notable(self) -> dict[str, int]:
        """How often the relay logged what shows the chaos reached it (for the run's summary)."""
        counted = Counter(
            str(e.get("msg")) + (f" ({e['reason']})" if "reason" in e else "")
            for e in self.log_entries()
        )
        return {msg: n for msg, n in counted.items() if msg.startswith(NOTABLE)}

    async def ops(self, path: str) -> str:
        """GET ``path`` from the relay started last, once it is ready (its view restored)."""
        await self.world.wait_until(
            lambda: len(self._ops_ports()) > self._runs_before, timeout=60, what="the ops server"
        )
        url = f"http://127.0.0.1:{self._ops_ports()[-1]}"
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                async with session.get(f"{url}/readyz") as response:
                    return response.status == 200

            await self.world.wait_until(ready, timeout=60, what="the relay ready", interval=0.2)
            async with session.get(f"{url}{path}") as response:
                response.raise_for_status()
                return await response.text()

    async def idle(self) -> None:
        """Wait until the relay has no partner work left: no operation pending on any partition.

        The partner may hold the expected state while a retry is still due (a withdrawal whose
        answer was lost, tried again after its backoff); a scripted answer set then would meet
        that retry instead of the request it is meant for.
        """

        async def nothing_pending() -> bool:
            status = orjson.loads(await self.ops("/status"))
            return all(p["pending_operations"] == 0 for p in status["partitions"].values())

        await self.world.wait_until(
            nothing_pending, timeout=60, what="the relay idle", interval=0.3
        )


@dataclass
class PartnerSide:
    """What the partner-side cases add to the stream's outcome."""

    kept: set[tuple[str, str]] = field(default_factory=set)  # withdrawal refused: still there
    expected: dict[tuple[str, str], str] = field(default_factory=dict)  # sent, exactly once
    parked: dict[tuple[str, str, str], str] = field(default_factory=dict)  # reason (prefix)


async def partner_side(run: ChaosRun, stream: ChaosStream) -> PartnerSide:
    """Issue #7's partner-side cases, one at a time from the converged state and an idle relay,
    so that each scripted answer meets the request it is meant for. No restart follows: a
    restart sends parked work again, which is the operator's fix, not the relay's failure."""
    world, lsc, sandbox, side = run.world, stream.lsc, run.world.sandbox, PartnerSide()
    # Withdrawals refused: a revoked key (403), and a 401 that echoes the credentials.
    refusals = (Scripted(Answer.REFUSE, 403), Scripted(Answer.ECHO_CREDENTIALS, 401))
    targets = (("agence-nord", "nord-1"), ("agence-est", "est-1"))
    for place, refusal in zip(targets, refusals, strict=True):
        condominium = world.agencies[place[0]].buildings[place[1]]
        sent = sorted(d for d in lsc.truth[place] if (condominium, d) in stream.expected)
        if not sent:
            continue
        await run.idle()  # the last withdrawal's retries, if any, are over
        sandbox.script("DELETE", refusal)
        del lsc.truth[place][sent[0]]
        side.kept.add((condominium, sent[0]))
        side.parked[(*place, sent[0])] = "partner_refused"
        items = lsc.listing(place, MODULES)
        for part in lsc.snapshot(place, items, modules=MODULES, taken_at=lsc.tick(), parts=2):
            await run.publish(manifest_record(part, what=f"manifest withdrawing {sent[0]}"))
        await world.wait_until(lambda: sandbox.scripted_left("DELETE") == 0, what="a refusal")
    # An upload refused for good by an answer that echoes the credentials: a dead letter.
    place = ("agence-nord", "nord-2")
    await run.idle()
    sandbox.script("POST", Scripted(Answer.ECHO_CREDENTIALS, 422))
    event = lsc.document_created(
        place, lsc.new_document(place, audience="building"), occurred_at=lsc.tick()
    )
    await run.publish(
        document_record(place, event, what="refused, echoing the key", reason="partner_rejected")
    )
    await world.wait_until(lambda: sandbox.scripted_left("POST") == 0, what="the upload refused")
    # Answers malformed after the partner acted (or not): each document there once.
    place = ("agence-est", "est-2")
    malformed = (Answer.BAD_JSON, Answer.HTML_502, Answer.ERROR_200, Answer.HANG)
    await run.idle()
    sandbox.script("POST", *(Scripted(answer) for answer in malformed))
    for _ in malformed:
        document = lsc.new_document(place, audience="building")
        await run.publish(lsc.publish_document(place, document))
        side.expected[("c-e2", document["id"])] = document["content"]["sha256"]
    # Content the document store does not serve: parked on its own, the agency goes on.
    place = ("agence-sud", "sud-1")
    stuck = {**lsc.new_document(place, audience="building"), "module": "ag"}
    name = f"{stuck['id'].replace(':', '_')}-unavailable"
    stored = world.store.add_bytes(name, make_pdf(stuck["title"]))
    stuck["content"] = {
        "media_type": "application/pdf",
        "size_bytes": stored.size,
        "sha256": stored.sha256,
        "url": stored.url,
    }
    world.store.set_status(name, 503)
    await run.publish(lsc.publish_document(place, stuck))
    side.parked[(*place, stuck["id"])] = "content_unavailable"
    after = {**lsc.new_document(place, audience="building"), "module": "contrats"}
    await run.publish(lsc.publish_document(place, after))
    side.expected[("c-s1", after["id"])] = after["content"]["sha256"]
    return side


async def carry_out(run: ChaosRun, stream: ChaosStream, rng: random.Random) -> None:
    """Publish the stream, switching faults as it says; restarts go on while it is published."""
    restarting: asyncio.Task[None] | None = None
    for step in stream.steps:
        if isinstance(step, Publish):
            await run.publish(step)
        elif isinstance(step, PartnerFaults):
            if step.change:
                run.world.sandbox.set_faults(Faults.model_validate(step.change))
            else:
                run.world.sandbox.clear_faults()
        elif isinstance(step, SlowContent):
            run.world.store.set_slow(step.name, step.delay_s)
        elif isinstance(step, Restart):
            if restarting is not None:
                await restarting
            pause, while_starting = rng.uniform(0.2, 2.5), rng.random() < 0.25
            restarting = asyncio.create_task(
                run.restart(step.signal, pause=pause, while_starting=while_starting)
            )
    if restarting is not None:
        await restarting
