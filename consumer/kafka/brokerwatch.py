"""How the relay rides out a Kafka outage: when it last reached the broker, and bounded retries.

A broker that is down for a while is waited for inside the process: records to produce are sent
again (bounded, jittered, counted), commits are tried again on the next interval, and readiness is
false meanwhile. Only a broker unreachable for longer than ``KAFKA__UNAVAILABLE_TIMEOUT_S`` stops
the relay, with ``KafkaUnavailableError`` naming what could not be reached and for how long.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiokafka.errors import KafkaError, KafkaTimeoutError

from consumer.errors import KafkaUnavailableError
from consumer.metrics import RelayMetrics

log = logging.getLogger(__name__)

_T = TypeVar("_T")
BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 5.0


class BrokerWatch:
    """When the relay last heard from the broker, and the bound past which it gives up.

    Every acknowledged produce, successful commit or answered probe is a contact. The relay is
    reachable while the last contact is within ``window_s``; it must stop once none happened for
    ``unavailable_timeout_s``.
    """

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        unavailable_timeout_s: float,
        window_s: float,
        metrics: RelayMetrics,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.unavailable_timeout_s = unavailable_timeout_s
        self.window_s = window_s
        self._metrics = metrics
        self._clock = clock or asyncio.get_running_loop().time
        self._last_contact = self._clock()
        self._lost_logged = False

    def touch(self) -> None:
        """The broker answered just now."""
        if self._lost_logged:
            log.warning(
                "Kafka reachable again",
                extra={"bootstrap_servers": self.bootstrap_servers, "after_s": self.silence_s()},
            )
            self._lost_logged = False
        self._last_contact = self._clock()
        self._metrics.kafka_reachable.set(1)

    def silence_s(self) -> float:
        """Seconds since the broker last answered."""
        return round(self._clock() - self._last_contact, 1)

    @property
    def reachable(self) -> bool:
        return self.silence_s() <= self.window_s

    def check(self) -> None:
        """Log once when the broker goes silent; raise once silence exceeds the bound."""
        silence = self.silence_s()
        if silence > self.window_s:
            self._metrics.kafka_reachable.set(0)
            if not self._lost_logged:
                self._lost_logged = True
                log.error(
                    "Kafka unreachable; waiting for it (not ready meanwhile)",
                    extra={"bootstrap_servers": self.bootstrap_servers, "silent_s": silence},
                )
        if silence > self.unavailable_timeout_s:
            raise KafkaUnavailableError(
                f"the Kafka broker(s) at {self.bootstrap_servers} have not answered for "
                f"{silence:g} s, more than CHOUETTE_RELAY_KAFKA__UNAVAILABLE_TIMEOUT_S="
                f"{self.unavailable_timeout_s:g}"
            )

    async def probe(self, ask: Callable[[], Awaitable[object]], *, timeout_s: float) -> None:
        """Ask the broker something cheap when nothing else showed it answers; a contact if so."""
        try:
            await asyncio.wait_for(ask(), timeout=timeout_s)
        except (KafkaError, TimeoutError):
            return
        self.touch()

    async def deliver(
        self, send: Callable[[], Awaitable[Awaitable[_T]]], *, what: str, operation: str
    ) -> _T:
        """Produce one record (``send`` returns aiokafka's delivery future) until acknowledged.

        aiokafka's idempotent producer never expires a batch: the delivery waits as long as the
        broker is away, so the bound is enforced here. A retriable error (the pending buffer full
        for ``request_timeout_ms``, a lost connection) sends the record again after a jittered
        backoff; a record not acknowledged within ``unavailable_timeout_s`` raises
        ``KafkaUnavailableError`` naming ``what``. Other Kafka errors propagate at once.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.unavailable_timeout_s
        attempt = 0
        while True:
            attempt += 1
            try:
                async with asyncio.timeout_at(deadline):
                    delivery = await send()
                    # Shielded: a timeout must not cancel a record aiokafka may still deliver.
                    result = await asyncio.shield(delivery)
            except TimeoutError:
                raise self._gave_up(what, loop.time() - started) from None
            except KafkaError as exc:
                if not (exc.retriable or isinstance(exc, KafkaTimeoutError)):
                    raise
                self._metrics.kafka_retries.labels(operation).inc()
                pause = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (attempt - 1))
                pause *= random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not cryptography
                if loop.time() + pause >= deadline:
                    raise self._gave_up(what, loop.time() - started) from exc
                log.warning(
                    "Kafka write failed; sending again",
                    extra={"what": what, "attempt": attempt, "error": repr(exc), "pause_s": pause},
                )
                await asyncio.sleep(pause)
                continue
            self.touch()
            return result

    def _gave_up(self, what: str, waited_s: float) -> KafkaUnavailableError:
        return KafkaUnavailableError(
            f"{what} was not acknowledged by the Kafka broker(s) at {self.bootstrap_servers} "
            f"within {waited_s:.0f} s (CHOUETTE_RELAY_KAFKA__UNAVAILABLE_TIMEOUT_S="
            f"{self.unavailable_timeout_s:g})"
        )
