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
import secrets
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from consumer.app.relay import Relay
from consumer.core.routing import load_routing
from consumer.kafka.connection import KafkaConnection
from consumer.kafka.startup import start_client
from consumer.local.console import AgencyProgress, ProgressView
from consumer.local.demo import (
    AGENCIES,
    ONBOARDING,
    demo_agencies,
    demo_publication,
    onboarding_publication,
    routing_toml,
)
from consumer.local.docstore import DocumentStore
from consumer.local.kafka import LocalKafka, create_topics
from consumer.local.sandbox import Account, RateLimit, SandboxServer
from consumer.partner.keys import ApiKeyStore
from consumer.settings import ENV_PREFIX, Settings

log = logging.getLogger(__name__)
LOCAL_DIR = Path("var/local")
OPERATOR_ENV = LOCAL_DIR / "operator.env"
PARTITIONS = 3


async def run_local(settings: Settings, *, onboarding: int = 0) -> int:
    """The local stack; ``onboarding`` documents of history for an agency awaiting approval."""
    agencies = demo_agencies(onboarding)
    keys_dir, routing_file, accounts = _write_local_config(agencies)
    view = ProgressView(sys.stdout)
    view.attach_logging()
    try:
        return await _run_stack(
            settings,
            view,
            agencies=agencies,
            keys_dir=keys_dir,
            routing_file=routing_file,
            accounts=accounts,
        )
    finally:
        view.close()


async def _run_stack(
    settings: Settings,
    view: ProgressView,
    *,
    agencies: dict[str, dict[str, Any]],
    keys_dir: Path,
    routing_file: Path,
    accounts: dict[str, Account],
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
                "http": settings.http.model_copy(
                    update={"host": "127.0.0.1", "admin_token_file": _admin_token()}
                ),
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
            _write_operator_env(local, relay.ops_port)
            view.say(f"operator   in another terminal: . {OPERATOR_ENV}; chouette-relay status")
            await _publish_demo(relay.connection, local, store, view, agencies)
            await _report(relay, sandbox, running, view, agencies)
        view.say("stopping: draining the relay, then the local servers and the broker...")
        await running
    if relay.failure is not None:
        view.say(f"stopped after a failure: {relay.failure!r}")
        return 1
    view.say("stopped.")
    return 0


def _write_local_config(
    agencies: dict[str, dict[str, Any]],
) -> tuple[Path, Path, dict[str, Account]]:
    """API key files and the routing file of the demo agencies, under ``var/local``."""
    LOCAL_DIR.mkdir(parents=True, exist_ok=True)
    keys_dir = LOCAL_DIR / "api-keys"
    keys_dir.mkdir(exist_ok=True)
    for stale in keys_dir.iterdir():  # an agency of an earlier, larger demo
        if stale.name not in agencies:
            stale.unlink()
    accounts: dict[str, Account] = {}
    for agency, spec in agencies.items():
        key = f"demo-key-{agency}"
        (keys_dir / agency).write_text(key + "\n", encoding="utf-8")
        # The sandbox allows each agency the rate its routing gives it, as ChouetteCopro would.
        rate = spec.get("rate_per_second")
        limit = RateLimit(rate_per_s=rate, burst=20) if rate else None
        accounts[key] = Account(frozenset(spec["buildings"].values()), limit)
    routing_file = LOCAL_DIR / "routing.toml"
    routing_file.write_text(routing_toml(agencies), encoding="utf-8")
    return keys_dir, routing_file, accounts


def _admin_token() -> Path:
    """The admin token of the local relay, so the operator's commands can ask it."""
    token = LOCAL_DIR / "admin-token"
    if not token.exists():
        token.write_text(secrets.token_urlsafe(24) + "\n", encoding="utf-8")
        token.chmod(0o600)
    return token


def _write_operator_env(settings: Settings, ops_port: int | None) -> None:
    """What a shell needs for the operator's commands to reach this stack."""
    lines = [
        "# Operator commands against the local stack of `make run`: . var/local/operator.env",
        f"export {ENV_PREFIX}KAFKA__BOOTSTRAP_SERVERS={settings.kafka.bootstrap_servers}",
        f"export {ENV_PREFIX}PARTNER__BASE_URL={settings.partner.base_url}",
        f"export {ENV_PREFIX}PARTNER__API_KEYS_DIR={settings.partner.api_keys_dir}",
        f"export {ENV_PREFIX}ROUTING_FILE={settings.routing_file}",
        f"export {ENV_PREFIX}HTTP__ADMIN_TOKEN_FILE={settings.http.admin_token_file}",
        "# the relay's ops server, for --replica",
        f"export REPLICA=http://127.0.0.1:{ops_port}",
        "",
    ]
    OPERATOR_ENV.write_text("\n".join(lines), encoding="utf-8")


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
    connection: KafkaConnection,
    settings: Settings,
    store: DocumentStore,
    view: ProgressView,
    agencies: dict[str, dict[str, Any]],
) -> None:
    now = dt.datetime.now(dt.UTC)
    records = demo_publication(store, now=now)
    if ONBOARDING in agencies:
        records += onboarding_publication(store, agencies[ONBOARDING], now=now)
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
    if ONBOARDING in agencies:
        documents = agencies[ONBOARDING]["documents"]
        view.say(
            f"onboarding {ONBOARDING}: {documents} documents of history wait for approval "
            f"(chouette-relay plan --agency {ONBOARDING})"
        )


async def _report(
    relay: Relay,
    sandbox: SandboxServer,
    running: asyncio.Task[None],
    view: ProgressView,
    agencies: dict[str, dict[str, Any]],
) -> None:
    """Refresh the view until the relay stops; its last state stays on screen."""
    footer = f"dead letters {{}}  ·  ops http://127.0.0.1:{relay.ops_port}/status  ·  Ctrl-C stops"
    while not relay.stopping.is_set() and not running.done():
        view.show(agency_progress(relay, sandbox, agencies), footer.format(_dead_letters(relay)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(relay.stopping.wait(), timeout=0.5)
    view.show(agency_progress(relay, sandbox, agencies), f"dead letters {_dead_letters(relay)}")
    view.close()


def agency_progress(
    relay: Relay, sandbox: SandboxServer, agencies: dict[str, dict[str, Any]] = AGENCIES
) -> list[AgencyProgress]:
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
        for agency, spec in agencies.items()
    ]


def _dead_letters(relay: Relay) -> int:
    total = 0.0
    for metric in relay.metrics.dead_letters.collect():
        total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return int(total)
