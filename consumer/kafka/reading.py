"""Reading topic partitions up to the ends they had when the reading began.

The operator tools (the plan, the cluster's overview, the history of operator actions) each read
some partitions from a start to the end offsets taken first, and not a record further: what is
written meanwhile belongs to the next look.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition


async def records_until(
    reader: AIOKafkaConsumer,
    ends: Mapping[TopicPartition, int],
    *,
    timeout_ms: int = 500,
    max_records: int = 5000,
) -> AsyncIterator[tuple[TopicPartition, Any]]:
    """Each record of the partitions of ``ends``, from ``reader``'s positions (assigned and
    sought by the caller) up to its end offset there, as ``(partition, record)``."""
    remaining = {tp for tp, end in ends.items() if await reader.position(tp) < end}
    while remaining:
        batches = await reader.getmany(*remaining, timeout_ms=timeout_ms, max_records=max_records)
        for tp, batch in batches.items():
            for record in batch:
                if record.offset < ends[tp]:
                    yield tp, record
        for tp in list(remaining):
            # The position moves past compacted gaps and past what was just returned.
            if await reader.position(tp) >= ends[tp]:
                remaining.discard(tp)
