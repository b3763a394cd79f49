"""How the relay reaches Kafka: client options, the TLS context and SASL credentials.

``kafka_connection`` turns the Kafka settings into one ``KafkaConnection`` (security protocol, TLS
context, SASL credentials read from their files), checked before any network I/O with messages
naming the variables. Every aiokafka client the relay creates takes ``connection.options()``; it
is started through ``consumer.kafka.startup.start_client``.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from consumer.errors import ConfigError
from consumer.mounted import read_secret, unreadable
from consumer.settings import ENV_PREFIX, KafkaSettings

_KAFKA = f"{ENV_PREFIX}KAFKA__"
# With api_version "auto", aiokafka bootstraps without asking the broker's API versions, so SASL
# falls back to the version-0 handshake, in which a refused password is only a closed connection.
# Naming the version makes it use SaslAuthenticate, whose answer says the credentials are wrong.
# 2.6 is the newest version aiokafka tells apart: what "auto" finds on any broker since 2.6.
SASL_API_VERSION = "2.6.0"


@dataclass(frozen=True, slots=True)
class KafkaConnection:
    """Where and how to connect; ``options()`` are keyword arguments for every aiokafka client."""

    bootstrap_servers: str
    client_id: str = "chouette-relay"
    security_protocol: str = "PLAINTEXT"
    ssl_context: ssl.SSLContext | None = None
    sasl_mechanism: str | None = None
    sasl_username: str = ""
    sasl_password: SecretStr | None = None
    password_file: Path | None = None  # only to name it in messages
    connect_timeout_s: float = 30.0

    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.ssl_context is not None:
            options["ssl_context"] = self.ssl_context
        if self.sasl_mechanism is not None and self.sasl_password is not None:
            options["sasl_mechanism"] = self.sasl_mechanism
            # aiokafka names them "plain" but uses them for SCRAM as well.
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password.get_secret_value()
            options["api_version"] = SASL_API_VERSION
        return options

    def describe(self) -> str:
        """For messages and logs: never the password."""
        how = self.security_protocol
        if self.sasl_mechanism:
            how += f" {self.sasl_mechanism} as {self.sasl_username!r}"
        return f"{self.bootstrap_servers} ({how})"


def kafka_connection(kafka: KafkaSettings) -> KafkaConnection:
    """The checked connection of ``kafka``; every problem found is named in one ``ConfigError``."""
    problems = _combination_problems(kafka)
    password: SecretStr | None = None
    key_password: str | None = None
    for name, path in (
        ("SSL_CA_FILE", kafka.ssl_ca_file),
        ("SSL_CERT_FILE", kafka.ssl_cert_file),
        ("SSL_KEY_FILE", kafka.ssl_key_file),
    ):
        if path is not None and (problem := unreadable(path)):
            problems.append(f"{_KAFKA}{name}: {problem}")
    if kafka.sasl_password_file is not None:
        try:
            password = SecretStr(read_secret(kafka.sasl_password_file))
        except ConfigError as exc:
            problems.append(f"{_KAFKA}SASL_PASSWORD_FILE: {exc}")
    if kafka.ssl_key_password_file is not None:
        try:
            key_password = read_secret(kafka.ssl_key_password_file)
        except ConfigError as exc:
            problems.append(f"{_KAFKA}SSL_KEY_PASSWORD_FILE: {exc}")
    if problems:
        raise ConfigError("invalid Kafka security settings: " + "; ".join(problems))
    context = None
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        context = _kafka_tls_context(kafka, key_password)
    return KafkaConnection(
        bootstrap_servers=kafka.bootstrap_servers,
        client_id=kafka.client_id,
        security_protocol=kafka.security_protocol,
        ssl_context=context,
        sasl_mechanism=kafka.sasl_mechanism if password is not None else None,
        sasl_username=kafka.sasl_username,
        sasl_password=password,
        password_file=kafka.sasl_password_file,
        connect_timeout_s=kafka.connect_timeout_s,
    )


def _combination_problems(kafka: KafkaSettings) -> list[str]:
    protocol = kafka.security_protocol
    problems: list[str] = []
    sasl = {
        "SASL_MECHANISM": kafka.sasl_mechanism,
        "SASL_USERNAME": kafka.sasl_username,
        "SASL_PASSWORD_FILE": kafka.sasl_password_file,
    }
    if protocol.startswith("SASL_"):
        missing = [f"{_KAFKA}{name}" for name, value in sasl.items() if not value]
        if missing:
            problems.append(f"{_KAFKA}SECURITY_PROTOCOL={protocol} needs " + ", ".join(missing))
    else:
        for name, value in sasl.items():
            if value:
                problems.append(
                    f"{_KAFKA}{name} is set but {_KAFKA}SECURITY_PROTOCOL is {protocol}: "
                    "use SASL_SSL (or SASL_PLAINTEXT)"
                )
    tls = {
        "SSL_CA_FILE": kafka.ssl_ca_file,
        "SSL_CERT_FILE": kafka.ssl_cert_file,
        "SSL_KEY_FILE": kafka.ssl_key_file,
        "SSL_KEY_PASSWORD_FILE": kafka.ssl_key_password_file,
    }
    if protocol not in ("SSL", "SASL_SSL"):
        for name, value in tls.items():
            if value is not None:
                problems.append(
                    f"{_KAFKA}{name} is set but {_KAFKA}SECURITY_PROTOCOL is {protocol}: "
                    "use SSL or SASL_SSL"
                )
    if (kafka.ssl_cert_file is None) != (kafka.ssl_key_file is None):
        given, lacking = (
            ("SSL_CERT_FILE", "SSL_KEY_FILE")
            if kafka.ssl_key_file is None
            else ("SSL_KEY_FILE", "SSL_CERT_FILE")
        )
        problems.append(f"{_KAFKA}{given} is set without {_KAFKA}{lacking}: mutual TLS needs both")
    if kafka.ssl_key_password_file is not None and kafka.ssl_key_file is None:
        problems.append(f"{_KAFKA}SSL_KEY_PASSWORD_FILE is set without {_KAFKA}SSL_KEY_FILE")
    return problems


def _kafka_tls_context(kafka: KafkaSettings, key_password: str | None) -> ssl.SSLContext:
    """System CAs unless a CA file is given (a private cluster CA, e.g. Strimzi's)."""
    try:
        context = ssl.create_default_context(
            cafile=str(kafka.ssl_ca_file) if kafka.ssl_ca_file else None
        )
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{_KAFKA}SSL_CA_FILE: {kafka.ssl_ca_file} holds no usable PEM certificate ({exc})"
        ) from None
    if kafka.ssl_cert_file is not None and kafka.ssl_key_file is not None:
        try:
            context.load_cert_chain(kafka.ssl_cert_file, kafka.ssl_key_file, key_password)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"{_KAFKA}SSL_CERT_FILE / {_KAFKA}SSL_KEY_FILE: cannot load the client "
                f"certificate {kafka.ssl_cert_file} with key {kafka.ssl_key_file} ({exc}); are "
                f"both PEM, do they match, is {_KAFKA}SSL_KEY_PASSWORD_FILE right?"
            ) from None
    return context
