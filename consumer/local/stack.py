"""The embedded local default behind ``make run``: Kafka, sandbox, document store, relay, demo.

Started when no Kafka and no partner settings are given. Everything listens on loopback and lives
under ``var/local`` (API keys, routing file); the broker's data is temporary, like the sandbox.
Ctrl-C stops the relay first (drain, commit, leave the group), then the servers, then the broker.
While it runs, ``console.ProgressView`` shows per agency what the sandbox holds and what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import sys
from collections import Counter
from pathlib import Path

from aiokafka import AIOKafkaProducer

from consumer.app.relay import Relay
from consumer.core.routing import load_routing
from consumer.kafka.connection import KafkaConnection
from consumer.kafka.startup import start_client
from consumer.local.console import AgencyProgress, ProgressView
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
    view = ProgressView(sys.stdout)
    view.attach_logging()
    try:
        return await _run_stack(settings, view, keys_dir, routing_file, accounts)
    finally:
        view.close()


async def _run_stack(
    settings: Settings,
    view: ProgressView,
    keys_dir: Path,
    routing_file: Path,
    accounts: dict[str, set[str]],
) -> int:
    view.say("starting the local Kafka broker (KRaft, single node)...")
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
        view.say(f"Kafka      {bootstrap} (broker log: {kafka.log_path})")
        control = sandbox.base_url.rsplit("/api", 1)[0]
        view.say(f"sandbox    {sandbox.base_url}  (inspect: {control}/_sandbox/state)")
        view.say(f"documents  {store.base_url}")
        running = asyncio.create_task(relay.run(), name="relay")
        if await _wait_ready(relay, running):
            view.say(
                f"relay      ready; ops on http://127.0.0.1:{relay.ops_port} (/status, /metrics)"
            )
            await _publish_demo(relay.connection, local, store, view)
            await _report(relay, sandbox, running, view)
        view.say("stopping: draining the relay, then the local servers and the broker...")
        await running
    if relay.failure is not None:
        view.say(f"stopped after a failure: {relay.failure!r}")
        return 1
    view.say("stopped.")
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


async def _wait_ready(relay: Relay, running: asyncio.Task[None]) -> bool:
    """True once the relay is ready; False when it was asked to stop first (Ctrl-C)."""
    while not relay.is_ready():
        if running.done():
            running.result()  # raises what stopped the relay
            return False
        if relay.stopping.is_set():
            return False
        await asyncio.sleep(0.2)
    return not relay.stopping.is_set()


async def _publish_demo(
    connection: KafkaConnection, settings: Settings, store: DocumentStore, view: ProgressView
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
    view.say(
        f"demo       published {len(records)} LSC events (history manifests, live documents, "
        "one per-owner document, one poison record)"
    )


async def _report(
    relay: Relay, sandbox: SandboxServer, running: asyncio.Task[None], view: ProgressView
) -> None:
    """Refresh the view until the relay stops; its last state stays on screen."""
    footer = f"dead letters {{}}  ·  ops http://127.0.0.1:{relay.ops_port}/status  ·  Ctrl-C stops"
    while not relay.stopping.is_set() and not running.done():
        view.show(agency_progress(relay, sandbox), footer.format(_dead_letters(relay)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(relay.stopping.wait(), timeout=0.5)
    view.show(agency_progress(relay, sandbox), f"dead letters {_dead_letters(relay)}")
    view.close()


def agency_progress(relay: Relay, sandbox: SandboxServer) -> list[AgencyProgress]:
    """Per agency: documents the sandbox holds and what the relay still has for it."""
    scheduler = relay.status()["scheduler"] or {}
    pending: Counter[str] = Counter(scheduler.get("running", {}))
    for queued in scheduler.get("queued", {}).values():
        pending.update(queued)
    breakers = scheduler.get("breakers", {})
    parked = Counter(p["agency"] for p in relay.parked(limit=sys.maxsize))
    held: Counter[str] = Counter()
    for entry in relay.held():
        held[entry["agency"]] += entry["documents"]
    return [
        AgencyProgress(
            agency=agency,
            in_sandbox=sum(len(sandbox.documents(c)) for c in spec["buildings"].values()),
            pending=pending[agency],
            parked=parked[agency],
            held=held[agency],
            breaker=str(breakers.get(agency, "closed")),
        )
        for agency, spec in AGENCIES.items()
    ]


def _dead_letters(relay: Relay) -> int:
    total = 0.0
    for metric in relay.metrics.dead_letters.collect():
        total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return int(total)
