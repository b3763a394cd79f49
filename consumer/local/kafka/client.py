"""The local stack's own Kafka clients: is the broker answering, and creating topics.

Both run plain aiokafka against the PLAINTEXT listener; the broker's start-up check runs in a
fresh event loop on a private thread, so it works whether or not its caller owns a loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from aiokafka import AIOKafkaClient
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from consumer.kafka.connection import KafkaConnection

_T = TypeVar("_T")


def run_in_fresh_loop(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    # A private thread keeps asyncio.run away from whatever loop the caller's thread owns.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="local-kafka") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


async def broker_answers(bootstrap: str) -> bool:
    options = KafkaConnection(bootstrap_servers=bootstrap).options()
    client = AIOKafkaClient(**options, request_timeout_ms=5000)
    try:
        await client.bootstrap()
        return bool(client.cluster.brokers())
    except KafkaError:
        return False
    finally:
        await client.close()


async def create_topics(
    bootstrap: str,
    names: list[str],
    *,
    partitions: int,
    config: dict[str, str] | None = None,
    timeout_ms: int = 30_000,
) -> None:
    """Create ``names`` with ``partitions`` partitions and ``config``; existing topics are kept."""
    options = KafkaConnection(bootstrap_servers=bootstrap).options()
    admin = AIOKafkaAdminClient(**options, request_timeout_ms=timeout_ms)
    try:
        await admin.start()
        topics = [NewTopic(name, partitions, 1, topic_configs=dict(config or {})) for name in names]
        response = await admin.create_topics(topics, timeout_ms=timeout_ms)
    finally:
        await admin.close()
    for topic, code, message in response.topic_errors:
        error = for_code(code)
        if code and error is not TopicAlreadyExistsError:
            raise error(f"cannot create topic {topic!r}: {message}")
