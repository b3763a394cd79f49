"""A Kafka write waits out a short outage, counts its retries, and gives up only past the bound."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NodeNotReadyError,
)
from prometheus_client import CollectorRegistry

from consumer.errors import KafkaUnavailableError
from consumer.kafka.brokerwatch import BrokerWatch
from consumer.metrics import RelayMetrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


REGISTRIES: dict[int, CollectorRegistry] = {}


def watch(*, bound: float = 30.0, window: float = 10.0, clock: Clock | None = None) -> BrokerWatch:
    registry = CollectorRegistry()
    made = BrokerWatch(
        bootstrap_servers="kafka-0:9092",
        unavailable_timeout_s=bound,
        window_s=window,
        metrics=RelayMetrics.create(registry, version="test"),
        clock=clock,
    )
    REGISTRIES[id(made)] = registry
    return made


def sample(w: BrokerWatch, name: str, **labels: str) -> float | None:
    return REGISTRIES[id(w)].get_sample_value(f"chouette_relay_{name}", labels)


def retries(w: BrokerWatch, operation: str) -> float | None:
    return sample(w, "kafka_retries_total", operation=operation)


def sender(
    outcomes: list[BaseException | None], calls: list[int]
) -> Callable[[], Awaitable[Awaitable[str]]]:
    """A producer's ``send``: each call fails with the next outcome, or is acknowledged."""

    async def send() -> Awaitable[str]:
        calls.append(1)
        outcome = outcomes.pop(0) if outcomes else None
        if isinstance(outcome, KafkaTimeoutError):
            raise outcome  # the pending buffer stayed full: send itself fails
        delivery: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if outcome is None:
            delivery.set_result("acknowledged")
        else:
            delivery.set_exception(outcome)
        return delivery

    return send


async def test_a_write_is_sent_again_after_retriable_failures_and_each_retry_is_counted() -> None:
    w = watch()
    calls: list[int] = []
    outcomes: list[BaseException | None] = [
        KafkaTimeoutError(),
        KafkaConnectionError(),
        NodeNotReadyError(),
    ]
    result = await w.deliver(sender(outcomes, calls), what="a state record", operation="changelog")
    assert result == "acknowledged"
    assert len(calls) == 4
    assert retries(w, "changelog") == 3
    assert w.reachable


async def test_a_write_never_acknowledged_within_the_bound_names_what_and_the_setting() -> None:
    w = watch(bound=0.3)

    async def send() -> Awaitable[str]:
        return asyncio.get_running_loop().create_future()  # the broker never answers

    with pytest.raises(KafkaUnavailableError) as raised:
        await w.deliver(send, what="a state record for partition 2", operation="changelog")
    message = str(raised.value)
    assert "a state record for partition 2" in message
    assert "kafka-0:9092" in message
    assert "CHOUETTE_RELAY_KAFKA__UNAVAILABLE_TIMEOUT_S=0.3" in message


async def test_a_write_failing_again_and_again_stops_at_the_bound() -> None:
    w = watch(bound=0.5)
    calls: list[int] = []
    failures: list[BaseException | None] = [KafkaConnectionError() for _ in range(1000)]
    with pytest.raises(KafkaUnavailableError):
        await w.deliver(sender(failures, calls), what="a dead letter", operation="dead_letter")
    assert 1 < len(calls) < 20, "jittered backoff, not a busy loop"
    assert retries(w, "dead_letter") == len(calls)


async def test_an_error_that_retrying_cannot_fix_is_raised_at_once() -> None:
    w = watch()
    calls: list[int] = []
    send = sender([MessageSizeTooLargeError()], calls)
    with pytest.raises(MessageSizeTooLargeError):
        await w.deliver(send, what="a dead letter", operation="dead_letter")
    assert len(calls) == 1
    assert retries(w, "dead_letter") == 0


def test_silence_makes_the_relay_unready_then_past_the_bound_stops_it() -> None:
    clock = Clock()
    w = watch(bound=60.0, window=10.0, clock=clock)
    assert w.reachable
    clock.now += 11
    w.check()
    assert not w.reachable
    assert sample(w, "kafka_reachable") == 0
    w.touch()
    assert w.reachable
    clock.now += 61
    with pytest.raises(KafkaUnavailableError, match=r"kafka-0:9092 have not answered for 61 s"):
        w.check()


async def test_a_probe_that_answers_is_a_contact_and_one_that_fails_is_not() -> None:
    clock = Clock()
    w = watch(window=10.0, clock=clock)
    clock.now += 20

    async def down() -> object:
        raise KafkaConnectionError()

    await w.probe(down, timeout_s=1.0)
    assert not w.reachable

    async def up() -> object:
        return {"topics"}

    await w.probe(up, timeout_s=1.0)
    assert w.reachable
