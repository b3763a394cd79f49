"""Large inline PDFs have a memory budget of their own: a backlog of them stops reading, not RAM.

A document's PDF may come inline, base64 in the event, up to a record's size. The per-operation
budgets count operations at about 1 kB each; a backlog of 100 kB inline PDFs behind a slow
partner would hold a hundred times that. ``KAFKA__MAX_PENDING_INLINE_BYTES`` bounds the inline
content the replica's queued uploads hold: at it, the partitions holding such uploads stop reading
(their records wait in Kafka), and they read again under half of it. Real broker, real sandbox.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os

import pytest

from consumer.local.pdf import make_pdf
from consumer.settings import KafkaSettings
from tests.fixtures.relay import AgencySpec, Json, RelayWorld, WorldFactory, metric

pytestmark = pytest.mark.integration

AGENCY, BUILDING, CONDOMINIUM = "agence-a", "bat-1", "c-1"
DOCUMENTS = 30
PDF_BYTES = 100_000
BUDGET = 1_048_576
POLL = 4  # records a fetch brings at most: what may arrive on top of the budget


def _large_inline(world: RelayWorld, number: int) -> Json:
    document = world.document(index=number)
    data = make_pdf(f"Document {number}") + b"%" + os.urandom(PDF_BYTES).hex().encode()
    document["content"] = {
        "media_type": "application/pdf",
        "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "inline_base64": base64.b64encode(data).decode(),
    }
    return document


async def test_a_backlog_of_large_inline_pdfs_stops_reading_at_the_budget(
    relay_world: WorldFactory,
) -> None:
    world = await relay_world(
        # One upload a second: the backlog builds while the relay reads.
        agencies={
            AGENCY: AgencySpec(buildings={BUILDING: CONDOMINIUM}, rate_per_second=1.0, burst=1)
        },
        partitions=1,
    )
    kafka = world.settings().kafka.model_dump()
    relay = await world.start_relay(
        kafka=KafkaSettings(
            **{**kafka, "max_pending_inline_bytes": BUDGET, "max_poll_records": POLL}
        )
    )
    documents = [_large_inline(world, n) for n in range(DOCUMENTS)]
    inline_size = len(documents[0]["content"]["inline_base64"])
    await world.publish(*(world.document_created(AGENCY, BUILDING, d) for d in documents))

    most, paused_seen = 0, False
    while len(world.partner_references(CONDOMINIUM)) < DOCUMENTS // 3:
        status = relay.status()
        [partition] = status["partitions"].values()
        most = max(most, partition["pending_inline_bytes"])
        # The replica's gauge says the same (one partition here).
        gauge = await metric(relay, "chouette_relay_queued_inline_bytes")
        assert gauge is not None
        assert gauge <= BUDGET + POLL * inline_size
        paused_seen |= bool(status["over_budget"] and partition["reading_paused"])
        await asyncio.sleep(0.05)

    assert paused_seen, "reading never paused for the inline content's budget"
    # Without the budget the whole backlog (about 8 MB) is read and held at once.
    assert most <= BUDGET + POLL * inline_size
    await world.wait_until(
        lambda: len(world.partner_references(CONDOMINIUM)) == DOCUMENTS,
        timeout=120,
        what="every document published, once each",
    )
    await world.wait_until(
        lambda: relay.status()["partitions"]["0"]["pending_inline_bytes"] == 0,
        what="the inline content of finished uploads let go",
    )
    assert await metric(relay, "chouette_relay_queued_inline_bytes") == 0
