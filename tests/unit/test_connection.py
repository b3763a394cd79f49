"""Kafka security settings: what start-up refuses, what every client gets, what is never shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer.errors import ConfigError
from consumer.kafka.connection import kafka_connection
from consumer.local.tls import Pki, make_pki
from consumer.partner.tls import https_context
from consumer.settings import KafkaSettings, Settings, load_settings

PASSWORD = "s3cret-Passw0rd"
BOOTSTRAP = "kafka-0.kafka:9093"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "password"
    path.write_text(PASSWORD + "\n", encoding="utf-8")
    return path


def scram(password_file: Path, **changes: Any) -> KafkaSettings:
    values: dict[str, Any] = {
        "bootstrap_servers": BOOTSTRAP,
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "relay",
        "sasl_password_file": password_file,
    }
    values.update(changes)
    return KafkaSettings(**values)


def refusal(settings: KafkaSettings) -> str:
    with pytest.raises(ConfigError) as caught:
        kafka_connection(settings)
    return str(caught.value)


def test_sasl_over_tls_gives_every_client_the_same_options(password_file: Path) -> None:
    options = kafka_connection(scram(password_file)).options()
    assert options["bootstrap_servers"] == BOOTSTRAP
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "relay"
    assert options["sasl_plain_password"] == PASSWORD  # the trailing newline is not part of it
    assert options["ssl_context"].verify_mode.name == "CERT_REQUIRED"
    assert options["ssl_context"].check_hostname


def test_plaintext_stays_plaintext() -> None:
    options = kafka_connection(KafkaSettings(bootstrap_servers=BOOTSTRAP)).options()
    assert options == {
        "bootstrap_servers": BOOTSTRAP,
        "client_id": "chouette-relay",
        "security_protocol": "PLAINTEXT",
    }


def test_mutual_tls_loads_an_encrypted_client_key(pki: Pki) -> None:
    connection = kafka_connection(
        KafkaSettings(
            bootstrap_servers=BOOTSTRAP,
            security_protocol="SSL",
            ssl_ca_file=pki.ca_file,
            ssl_cert_file=pki.client_cert_file,
            ssl_key_file=pki.client_key_file,
            ssl_key_password_file=pki.client_key_password_file,
        )
    )
    assert connection.ssl_context is not None
    assert "sasl_mechanism" not in connection.options()


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"security_protocol": "SSL"}, ["KAFKA__SASL_MECHANISM", "KAFKA__SECURITY_PROTOCOL"]),
        ({"security_protocol": "PLAINTEXT"}, ["KAFKA__SASL_USERNAME", "SECURITY_PROTOCOL"]),
        ({"sasl_mechanism": None}, ["KAFKA__SASL_MECHANISM"]),
        ({"sasl_username": ""}, ["KAFKA__SASL_USERNAME"]),
        ({"sasl_password_file": None}, ["KAFKA__SASL_PASSWORD_FILE"]),
        ({"ssl_cert_file": Path("/x.pem")}, ["KAFKA__SSL_CERT_FILE", "KAFKA__SSL_KEY_FILE"]),
        ({"ssl_key_file": Path("/x.key")}, ["KAFKA__SSL_KEY_FILE", "KAFKA__SSL_CERT_FILE"]),
        ({"ssl_key_password_file": Path("/p")}, ["KAFKA__SSL_KEY_PASSWORD_FILE"]),
        ({"ssl_ca_file": Path("/missing/ca.pem")}, ["KAFKA__SSL_CA_FILE", "does not exist"]),
    ],
)
def test_combinations_that_cannot_work_stop_start_up_naming_the_variables(
    password_file: Path, changes: dict[str, Any], named: list[str]
) -> None:
    message = refusal(scram(password_file, **changes))
    for name in named:
        assert name in message


def test_tls_files_without_a_tls_protocol_are_refused(pki: Pki) -> None:
    message = refusal(KafkaSettings(bootstrap_servers=BOOTSTRAP, ssl_ca_file=pki.ca_file))
    assert "CHOUETTE_RELAY_KAFKA__SSL_CA_FILE is set but" in message
    assert "SSL or SASL_SSL" in message


def test_a_missing_empty_or_unreadable_password_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n", encoding="utf-8")
    for path, why in (
        (tmp_path / "absent", "does not exist"),
        (empty, "is empty"),
        (tmp_path, "cannot be read"),  # a directory: unreadable even as root
    ):
        message = refusal(scram(path))
        assert "CHOUETTE_RELAY_KAFKA__SASL_PASSWORD_FILE" in message
        assert why in message


def test_a_file_that_is_not_a_certificate_is_refused(tmp_path: Path, password_file: Path) -> None:
    message = refusal(scram(password_file, ssl_ca_file=password_file))
    assert "CHOUETTE_RELAY_KAFKA__SSL_CA_FILE" in message
    assert "no usable PEM certificate" in message


def test_a_wrong_key_password_is_refused(pki: Pki, password_file: Path) -> None:
    message = refusal(
        KafkaSettings(
            bootstrap_servers=BOOTSTRAP,
            security_protocol="SSL",
            ssl_cert_file=pki.client_cert_file,
            ssl_key_file=pki.client_key_file,
            ssl_key_password_file=password_file,
        )
    )
    assert "CHOUETTE_RELAY_KAFKA__SSL_KEY_PASSWORD_FILE" in message


def test_the_password_is_never_shown(password_file: Path) -> None:
    connection = kafka_connection(scram(password_file))
    assert PASSWORD not in repr(connection)
    assert PASSWORD not in connection.describe()
    settings = Settings(kafka=scram(password_file))
    logged = orjson.dumps(settings.masked()).decode()  # what the start-up log line carries
    assert str(password_file) in logged
    assert PASSWORD not in logged


def test_the_group_instance_id_defaults_to_the_pod_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POD_NAME", raising=False)
    assert KafkaSettings().group_instance_id is None
    monkeypatch.setenv("POD_NAME", "chouette-relay-7d9c-x2k4f")
    assert KafkaSettings().group_instance_id == "chouette-relay-7d9c-x2k4f"
    assert Settings().kafka.group_instance_id == "chouette-relay-7d9c-x2k4f"
    monkeypatch.setenv("CHOUETTE_RELAY_KAFKA__GROUP_INSTANCE_ID", "relay-0")
    assert Settings().kafka.group_instance_id == "relay-0"
    monkeypatch.setenv("CHOUETTE_RELAY_KAFKA__GROUP_INSTANCE_ID", "")
    assert Settings().kafka.group_instance_id is None  # empty opts out


def test_a_security_protocol_without_a_broker_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHOUETTE_RELAY_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ConfigError, match="KAFKA__BOOTSTRAP_SERVERS is not set"):
        load_settings()


def test_a_partner_ca_file_that_cannot_be_used_names_its_variable(tmp_path: Path) -> None:
    assert https_context(None, "PARTNER__CA_FILE") is None  # aiohttp's default: verify
    with pytest.raises(ConfigError, match=r"CHOUETTE_RELAY_PARTNER__CA_FILE: .* does not exist"):
        https_context(tmp_path / "absent.pem", "PARTNER__CA_FILE")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"CHOUETTE_RELAY_CONTENT__CA_FILE: .* no usable PEM"):
        https_context(junk, "CONTENT__CA_FILE")
