"""The relay, the dry run and the CLI reach a Kafka that requires TLS with SASL or a client cert.

This module runs its own broker (``consumer.local.tls``): a SASL_SSL listener (SCRAM-SHA-512,
SCRAM-SHA-256, PLAIN) and an SSL listener that requires a client certificate, both signed by a CA
made here. Topics are created and events published on the broker's PLAINTEXT listener, as LSC would
on its own; the relay gets only the secured address. Refused credentials, an untrusted broker, a
missing client certificate and a silent listener stop start-up with a message naming the setting.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from consumer.core.routing import load_routing
from consumer.errors import KafkaConnectError
from consumer.kafka.connection import kafka_connection
from consumer.kafka.startup import start_client
from consumer.local.kafka import LocalKafka
from consumer.local.tls import SASL_SSL, SSL, SecuredListeners
from consumer.ops.dryrun import build_plan
from consumer.settings import KafkaSettings
from tests.fixtures.relay import AgencySpec, Json, RelayWorld, WorldFactory, uncommitted_records

pytestmark = pytest.mark.integration

AGENCY = "agence-a"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> SecuredListeners:
    return SecuredListeners.create(tmp_path_factory.mktemp("secured-kafka"))


@pytest.fixture(scope="module")
def secured_kafka(secured: SecuredListeners) -> Iterator[LocalKafka]:
    with LocalKafka(secured=secured) as kafka:
        yield kafka


@pytest.fixture(scope="module")
def kafka_bootstrap(secured_kafka: LocalKafka) -> str:
    """This module's worlds live on the secured broker (set up through its PLAINTEXT listener)."""
    return secured_kafka.bootstrap_servers


def sasl_ssl(
    world: RelayWorld, kafka: LocalKafka, secured: SecuredListeners, **changes: Any
) -> KafkaSettings:
    """The world's Kafka settings, pointed at the SASL_SSL listener with the SCRAM user."""
    values = world.settings().kafka.model_dump()
    values.update(
        bootstrap_servers=kafka.listener(SASL_SSL),
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username=secured.username,
        sasl_password_file=secured.password_file,
        ssl_ca_file=secured.pki.ca_file,
    )
    values.update(changes)
    return KafkaSettings(**values)


def mutual_tls(
    world: RelayWorld, kafka: LocalKafka, secured: SecuredListeners, **changes: Any
) -> KafkaSettings:
    """The world's Kafka settings, pointed at the SSL listener with the client certificate."""
    values = world.settings().kafka.model_dump()
    values.update(
        bootstrap_servers=kafka.listener(SSL),
        security_protocol="SSL",
        ssl_ca_file=secured.pki.ca_file,
        ssl_cert_file=secured.pki.client_cert_file,
        ssl_key_file=secured.pki.client_key_file,
        ssl_key_password_file=secured.pki.client_key_password_file,
    )
    values.update(changes)
    return KafkaSettings(**values)


async def cli(world: RelayWorld, kafka: KafkaSettings, *args: str) -> tuple[int, str, str]:
    """``chouette-relay ARGS`` with the environment a pod would have: exit code, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumer.cli",
        *args,
        env=world.environment(kafka=kafka),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    # A guard against a hang, not a timing assertion: a failed start must end on its own.
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def manifest(world: RelayWorld, documents: list[Json], *, hours_ago: int) -> list[Json]:
    taken_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours_ago)
    return world.manifest_parts(AGENCY, "bat-1", documents, taken_at=taken_at)


@pytest.fixture
async def world(relay_world: WorldFactory) -> RelayWorld:
    return await relay_world(agencies={AGENCY: AgencySpec(buildings={"bat-1": "c-1"})})


async def test_the_relay_forwards_through_sasl_ssl_and_the_cli_reads_through_mutual_tls(
    world: RelayWorld, secured_kafka: LocalKafka, secured: SecuredListeners
) -> None:
    kafka = sasl_ssl(world, secured_kafka, secured, group_instance_id="chouette-relay-0")
    relay = await world.start_relay(kafka=kafka)
    documents = [world.document() for _ in range(12)]

    await world.publish(*manifest(world, documents, hours_ago=2))
    await world.wait_until(
        lambda: len(world.partner_references("c-1")) == 12, what="12 documents on the partner"
    )
    await world.publish(*manifest(world, documents[:1], hours_ago=1))
    await world.wait_until(
        lambda: [h["documents"] for h in relay.held()] == [11],
        what="the 11 withdrawals held by the guard",
    )

    code, out, err = await cli(world, mutual_tls(world, secured_kafka, secured), "held")
    assert code == 0, err
    assert [(h["building"], h["documents"]) for h in orjson.loads(out)["held"]] == [("bat-1", 11)]

    async def committed() -> bool:
        return await uncommitted_records(world) == 0

    # A static member (group instance id) joins, is assigned and commits like any other.
    await world.wait_until(committed, what="the input offsets committed by the static member")


async def test_the_dry_run_reads_through_sasl_ssl_with_each_mechanism(
    world: RelayWorld, secured_kafka: LocalKafka, secured: SecuredListeners
) -> None:
    await world.publish(*manifest(world, [world.document() for _ in range(3)], hours_ago=1))

    code, out, err = await cli(
        world,
        sasl_ssl(world, secured_kafka, secured, sasl_mechanism="SCRAM-SHA-256"),
        "plan",
        "--json",
    )
    assert code == 0, err
    assert orjson.loads(out)["uploads"] == 3
    assert secured.password not in out + err

    plain = world.settings(kafka=sasl_ssl(world, secured_kafka, secured, sasl_mechanism="PLAIN"))
    plan = await build_plan(plain, load_routing(world.routing_file), agency=None)
    assert plan.uploads == 3


async def test_a_wrong_password_stops_start_up_naming_the_settings(
    world: RelayWorld, secured_kafka: LocalKafka, secured: SecuredListeners, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n", encoding="utf-8")

    code, out, err = await cli(
        world, sasl_ssl(world, secured_kafka, secured, sasl_password_file=wrong), "run"
    )

    assert code == 2
    assert "refused the credentials" in err
    assert "CHOUETTE_RELAY_KAFKA__SASL_USERNAME" in err
    assert f"CHOUETTE_RELAY_KAFKA__SASL_PASSWORD_FILE ({wrong})" in err
    assert "not-the-password" not in out + err
    assert world.sandbox.documents("c-1") == []


async def test_an_untrusted_broker_certificate_stops_start_up_naming_the_ca_setting(
    world: RelayWorld, secured_kafka: LocalKafka, secured: SecuredListeners
) -> None:
    with pytest.raises(KafkaConnectError, match=r"does not trust .*KAFKA__SSL_CA_FILE"):
        await world.start_relay(kafka=sasl_ssl(world, secured_kafka, secured, ssl_ca_file=None))


async def test_a_missing_client_certificate_stops_start_up_naming_the_certificate_settings(
    world: RelayWorld, secured_kafka: LocalKafka, secured: SecuredListeners
) -> None:
    without_certificate = mutual_tls(
        world,
        secured_kafka,
        secured,
        ssl_cert_file=None,
        ssl_key_file=None,
        ssl_key_password_file=None,
    )
    with pytest.raises(KafkaConnectError, match=r"requires a client certificate.*SSL_CERT_FILE"):
        await world.start_relay(kafka=without_certificate)


@pytest.fixture
async def silent_listener() -> AsyncIterator[str]:
    """A TCP port that accepts connections and never answers, like a listener behind a dead hop."""
    accepted: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()
    for writer in accepted:
        writer.close()
    await server.wait_closed()


async def test_a_silent_broker_stops_start_up_within_the_connect_timeout(
    world: RelayWorld, silent_listener: str
) -> None:
    values = world.settings().kafka.model_dump()
    values.update(bootstrap_servers=silent_listener, connect_timeout_s=1.0)
    # aiokafka alone would wait a request timeout (40 s) per attempt.
    with pytest.raises(KafkaConnectError, match=r"no answer within 1 s .*KAFKA__CONNECT_TIMEOUT_S"):
        await world.start_relay(kafka=KafkaSettings(**values))


async def test_an_unreachable_broker_names_the_bootstrap_setting() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
    connection = kafka_connection(KafkaSettings(bootstrap_servers=address))
    admin = AIOKafkaAdminClient(**connection.options())
    with pytest.raises(KafkaConnectError, match=r"cannot be reached .*KAFKA__BOOTSTRAP_SERVERS"):
        await start_client(admin, connection)
