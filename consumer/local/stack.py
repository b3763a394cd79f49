"""The embedded local default behind ``make run``: Kafka, sandbox, document store, relay, demo.

Started when no Kafka and no partner settings are given. Everything listens on loopback and lives
under ``var/local`` of the current folder (API keys, routing file, ``operator.env``), which one
stack at a time holds (a lock names the running one); the broker's data is temporary, like the
sandbox, unless kept in ``var/local/kept`` (``KeptStack``). Ctrl-C stops the relay first (drain,
commit, leave the group), then the servers, then the broker. While it runs,
``console.ProgressView`` shows per agency what the sandbox holds and what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import logging
import os
import secrets
import shlex
import sys
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import orjson
from aiokafka import AIOKafkaProducer

from consumer.app.relay import Relay
from consumer.core.routing import load_routing
from consumer.errors import ConfigError
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
from consumer.ops.webserver import listen_problem
from consumer.partner.keys import ApiKeyStore
from consumer.settings import ENV_PREFIX, Settings

log = logging.getLogger(__name__)
LOCAL_DIR = Path("var/local")
LOOPBACK = "127.0.0.1"
PARTITIONS = 3


async def run_local(settings: Settings, *, onboarding: int = 0, keep_data: bool = False) -> int:
    """The local stack; ``onboarding`` documents of history for an agency awaiting approval.

    With ``keep_data``, the broker's data, the document store's files and the sandbox's documents
    stay in ``var/local/kept`` and the next kept run starts from them (pauses, approvals, offsets,
    what was sent), without publishing the demo again.
    """
    local_dir = _absolute(LOCAL_DIR)  # operator.env must work from any folder
    with _hold(local_dir) as holder:
        port = settings.http.port
        if problem := listen_problem(LOOPBACK, port):
            raise ConfigError(
                f"{ENV_PREFIX}HTTP__PORT: {problem}: stop what listens there, or start with "
                f"{ENV_PREFIX}HTTP__PORT=0 (any free port; operator.env then names it $REPLICA)"
            )
        agencies = demo_agencies(onboarding)
        keys_dir, routing_file, accounts = _write_local_config(local_dir, agencies)
        view = ProgressView(sys.stdout)
        view.attach_logging()
        try:
            return await _run_stack(
                settings,
                view,
                agencies=agencies,
                local_dir=local_dir,
                keys_dir=keys_dir,
                routing_file=routing_file,
                accounts=accounts,
                keep=KeptStack(local_dir / "kept") if keep_data else None,
                holder=holder,
            )
        finally:
            view.close()


def _absolute(path: Path) -> Path:
    return path.absolute()


@dataclass(frozen=True, slots=True)
class KeptStack:
    """What a kept local stack carries to its next run: the broker's data directory, the
    document store's files and the sandbox's documents, and both servers' ports (the events in
    the broker name the store's URLs, the relay's view what the sandbox holds)."""

    directory: Path

    @property
    def kafka_dir(self) -> Path:
        return self.directory / "kafka"

    @property
    def _stack_file(self) -> Path:
        return self.directory / "stack.json"

    def ports(self) -> dict[str, int]:
        """The servers' ports of the kept run, checked free; empty when nothing was kept yet."""
        if not self._stack_file.is_file():
            return {}
        ports: dict[str, int] = orjson.loads(self._stack_file.read_bytes())["ports"]
        for server, port in ports.items():
            if problem := listen_problem(LOOPBACK, port):
                raise ConfigError(
                    f"the kept local stack's {server} needs {problem}: stop what listens there, "
                    f"or start afresh without KEEP (or delete {self.directory})"
                )
        return ports

    def restore(self, store: DocumentStore, sandbox: SandboxServer) -> None:
        store.load(self.directory / "documents")
        sandbox.restore(orjson.loads(self._stack_file.read_bytes())["sandbox"])

    def save(self, store: DocumentStore, sandbox: SandboxServer) -> None:
        store.save(self.directory / "documents")
        state = {
            "ports": {"store": store.port, "sandbox": sandbox.port},
            "sandbox": sandbox.export(),
        }
        self._stack_file.write_bytes(orjson.dumps(state))


@contextlib.contextmanager
def _hold(local_dir: Path) -> Iterator[TextIO]:
    """Hold ``local_dir`` for this stack, or say which stack holds it.

    The lock is the kernel's (``flock``): it goes with the process, however it ends, so a stack
    killed with SIGKILL leaves nothing to clean up. The file says who holds it, for the message.
    """
    local_dir.mkdir(parents=True, exist_ok=True)
    holder = (local_dir / "stack.lock").open("a+", encoding="utf-8")
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder.seek(0)
        running = holder.read().strip() or "a process"
        holder.close()
        raise ConfigError(
            f"a local stack already runs from {local_dir} ({running}); its files are in use: "
            "stop it (Ctrl-C in its terminal) first, or start this one from another folder"
        ) from None
    try:
        _say_who(holder, "starting")
        yield holder
    finally:
        holder.close()  # releases the lock


def _say_who(holder: TextIO, what: str) -> None:
    holder.seek(0)
    holder.truncate()
    holder.write(f"pid {os.getpid()}, since {dt.datetime.now():%H:%M:%S}, {what}\n")
    holder.flush()


async def _run_stack(
    settings: Settings,
    view: ProgressView,
    *,
    agencies: dict[str, dict[str, Any]],
    local_dir: Path,
    keys_dir: Path,
    routing_file: Path,
    accounts: dict[str, Account],
    keep: KeptStack | None,
    holder: TextIO,
) -> int:
    ports = keep.ports() if keep is not None else {}
    if keep is None:
        view.say("starting the local Kafka broker (KRaft, single node)...")
    else:
        view.say(f"starting the local Kafka broker on its kept data ({keep.kafka_dir})...")
    async with (
        LocalKafka(data_dir=keep.kafka_dir if keep else None) as kafka,
        DocumentStore(port=ports.get("store", 0)) as store,
        SandboxServer(
            accounts=accounts,
            rate_limit=RateLimit(rate_per_s=50, burst=50),
            port=ports.get("sandbox", 0),
        ) as sandbox,
    ):
        if keep is not None and ports:
            keep.restore(store, sandbox)
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
                    update={"host": LOOPBACK, "admin_token_file": _admin_token(local_dir)}
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
            operator_env = _write_operator_env(local_dir, local, relay.ops_port)
            _say_who(holder, f"ops on http://{LOOPBACK}:{relay.ops_port}")
            sourced = shlex.quote(str(operator_env))
            view.say(f"operator   in another terminal: . {sourced}; chouette-relay status")
            if ports:
                view.say("demo       already in the kept broker data: not published again")
            else:
                await _publish_demo(relay.connection, local, store, view, agencies)
            await _report(relay, sandbox, running, view, agencies)
        view.say("stopping: draining the relay, then the local servers and the broker...")
        await running
        if keep is not None:
            keep.save(store, sandbox)
            view.say(f"kept       the broker's data, documents and sandbox in {keep.directory}")
    if relay.failure is not None:
        view.say(f"stopped after a failure: {relay.failure!r}")
        return 1
    view.say("stopped.")
    return 0


def _write_local_config(
    local_dir: Path, agencies: dict[str, dict[str, Any]]
) -> tuple[Path, Path, dict[str, Account]]:
    """API key files and the routing file of the demo agencies, under ``var/local``."""
    keys_dir = local_dir / "api-keys"
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
    routing_file = local_dir / "routing.toml"
    routing_file.write_text(routing_toml(agencies), encoding="utf-8")
    return keys_dir, routing_file, accounts


def _admin_token(local_dir: Path) -> Path:
    """The admin token of the local relay, so the operator's commands can ask it."""
    token = local_dir / "admin-token"
    if not token.exists():
        token.write_text(secrets.token_urlsafe(24) + "\n", encoding="utf-8")
        token.chmod(0o600)
    return token


def _write_operator_env(local_dir: Path, settings: Settings, ops_port: int | None) -> Path:
    """What a shell needs for the operator's commands to reach this stack, from any folder."""
    path = local_dir / "operator.env"
    scripts = Path(sysconfig.get_path("scripts"))  # this virtualenv's bin: chouette-relay
    lines = [
        f"# Operator commands against the local stack of `make run`: . {shlex.quote(str(path))}",
        f'export PATH={shlex.quote(str(scripts))}:"$PATH"',
        f"export {ENV_PREFIX}KAFKA__BOOTSTRAP_SERVERS={settings.kafka.bootstrap_servers}",
        f"export {ENV_PREFIX}PARTNER__BASE_URL={settings.partner.base_url}",
        f"export {ENV_PREFIX}PARTNER__API_KEYS_DIR={_path(settings.partner.api_keys_dir)}",
        f"export {ENV_PREFIX}ROUTING_FILE={_path(settings.routing_file)}",
        f"export {ENV_PREFIX}HTTP__ADMIN_TOKEN_FILE={_path(settings.http.admin_token_file)}",
        "# the relay's ops server, for --replica",
        f"export REPLICA=http://{LOOPBACK}:{ops_port}",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _path(path: Path | None) -> str:
    return shlex.quote(str(path.absolute())) if path is not None else "''"


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
    status = relay.status()
    scheduler = status["scheduler"] or {}
    paused = set(status["paused"])
    backfill_paused = set(status["backfill_paused"])
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
            paused=agency in paused,
            backfill_paused=agency in backfill_paused,
        )
        for agency, spec in agencies.items()
    ]


def _dead_letters(relay: Relay) -> int:
    total = 0.0
    for metric in relay.metrics.dead_letters.collect():
        total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return int(total)
