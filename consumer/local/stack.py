"""The embedded local default behind ``make run``: Kafka, sandbox, document store, relay, demo.

Started when no Kafka and no partner settings are given. Everything listens on loopback and lives
under ``var/local`` (API keys, routing file); the broker's data is temporary, like the sandbox.
Ctrl-C stops the relay first (drain, commit, leave the group), then the servers, then the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import sys
from pathlib import Path

from aiokafka import AIOKafkaProducer

from consumer.app.relay import Relay
from consumer.core.routing import load_routing
from consumer.kafka.connection import KafkaConnection, start_client
from consumer.local.demo import AGENCIES, demo_publication, routing_toml
from consumer.local.docstore import DocumentStore
from consumer.local.kafka import LocalKafka, create_topics
from consumer.local.sandbox import RateLimit, SandboxServer
from consumer.partner.keys import ApiKeyStore
from consumer.settings import Settings

log = logging.getLogger(__name__)
LOCAL_DIR = Path("var/local")
PARTITIONS = 3


async def run_local(settings: Settings) -> int:
    keys_dir, routing_file, accounts = _write_local_config()

    _say("starting the local Kafka broker (KRaft, single node)...")
    async with (
        LocalKafka() as kafka,
        DocumentStore() as store,
        SandboxServer(accounts=accounts, rate_limit=RateLimit(rate_per_s=50, burst=50)) as sandbox,
    ):
        bootstrap = kafka.bootstrap_servers
        await create_topics(
            bootstrap,
            [settings.kafka.documents_topic, settings.kafka.manifests_topic],
            partitions=PARTITIONS,
        )
        local = settings.model_copy(
            update={
                "kafka": settings.kafka.model_copy(update={"bootstrap_servers": bootstrap}),
                "partner": settings.partner.model_copy(
                    update={"base_url": sandbox.base_url, "api_keys_dir": keys_dir}
                ),
                "content": settings.content.model_copy(
                    update={"allowed_hosts": (f"{store.host}:{store.port}",)}
                ),
                "http": settings.http.model_copy(update={"host": "127.0.0.1"}),
                "routing_file": routing_file,
            }
        )
        relay = Relay(
            settings=local,
            routing=load_routing(routing_file),
            api_keys=ApiKeyStore(keys_dir),
        )
        relay.install_signal_handlers()
        _say(f"Kafka      {bootstrap} (broker log: {kafka.log_path})")
        control = sandbox.base_url.rsplit("/api", 1)[0]
        _say(f"sandbox    {sandbox.base_url}  (inspect: {control}/_sandbox/state)")
        _say(f"documents  {store.base_url}")
        running = asyncio.create_task(relay.run(), name="relay")
        await _wait_ready(relay, running)
        _say(f"relay      ready; ops on http://127.0.0.1:{relay.ops_port} (/status, /metrics)")
        await _publish_demo(relay.connection, local, store)
        await _report(relay, sandbox, running)
        await running
    if relay.failure is not None:
        _say(f"stopped after a failure: {relay.failure!r}")
        return 1
    _say("stopped.")
    return 0


def _write_local_config() -> tuple[Path, Path, dict[str, set[str]]]:
    """API key files and the routing file of the demo agencies, under ``var/local``."""
    LOCAL_DIR.mkdir(parents=True, exist_ok=True)
    keys_dir = LOCAL_DIR / "api-keys"
    keys_dir.mkdir(exist_ok=True)
    accounts: dict[str, set[str]] = {}
    for agency, spec in AGENCIES.items():
        key = f"demo-key-{agency}"
        (keys_dir / agency).write_text(key + "\n", encoding="utf-8")
        accounts[key] = set(spec["buildings"].values())
    routing_file = LOCAL_DIR / "routing.toml"
    routing_file.write_text(routing_toml(), encoding="utf-8")
    return keys_dir, routing_file, accounts


async def _wait_ready(relay: Relay, running: asyncio.Task[None]) -> None:
    while not relay.is_ready():
        if running.done():
            running.result()  # raises what stopped the relay
            return
        await asyncio.sleep(0.2)


async def _publish_demo(
    connection: KafkaConnection, settings: Settings, store: DocumentStore
) -> None:
    records = demo_publication(store, now=dt.datetime.now(dt.UTC))
    topics = {
        "documents": settings.kafka.documents_topic,
        "manifests": settings.kafka.manifests_topic,
    }
    producer = AIOKafkaProducer(**connection.options(), acks="all")
    await start_client(producer, connection)
    try:
        for record in records:
            await producer.send_and_wait(
                topics[record.topic_kind],
                value=record.value,
                key=record.key,
                headers=record.headers,
            )
    finally:
        await producer.stop()
    _say(
        f"demo       published {len(records)} LSC events (history manifests, live documents, "
        "one per-owner document, one poison record)"
    )


async def _report(relay: Relay, sandbox: SandboxServer, running: asyncio.Task[None]) -> None:
    last = ""
    while not relay.stopping.is_set() and not running.done():
        held = sum(h["documents"] for h in relay.held())
        counts = {
            c: len(sandbox.documents(c))
            for spec in AGENCIES.values()
            for c in spec["buildings"].values()
        }
        line = "sandbox    " + "  ".join(f"{c}={n}" for c, n in counts.items())
        parked = sum(p["by_status"].get("parked", 0) for p in relay.status()["partitions"].values())
        line += f"  | held={held} parked={parked} dead-letters={_dead_letters(relay)}"
        if line != last:
            _say(line)
            last = line
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(relay.stopping.wait(), timeout=1.0)
    _say("stopping: draining the relay, then the local servers and the broker...")


def _dead_letters(relay: Relay) -> int:
    total = 0.0
    for metric in relay.metrics.dead_letters.collect():
        total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return int(total)


def _say(text: str) -> None:
    sys.stdout.write(f"[local] {text}\n")
    sys.stdout.flush()
