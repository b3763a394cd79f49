"""How the relay reaches Kafka: client options, the TLS context and SASL credentials.

``kafka_connection`` turns the Kafka settings into one ``KafkaConnection`` (security protocol, TLS
context, SASL credentials read from their files), checked before any network I/O with messages
naming the variables. Every aiokafka client the relay creates takes ``connection.options()`` and is
started through ``start_client``, which bounds the wait and says what to fix when Kafka refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.errors import (
    AuthenticationFailedError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from pydantic import SecretStr

from consumer.errors import ConfigError, KafkaConnectError
from consumer.mounted import read_secret, unreadable
from consumer.settings import ENV_PREFIX, KafkaSettings

_KAFKA = f"{ENV_PREFIX}KAFKA__"
_PROBE_TIMEOUT_S = 3.0
# With api_version "auto", aiokafka bootstraps without asking the broker's API versions, so SASL
# falls back to the version-0 handshake, in which a refused password is only a closed connection.
# Naming the version makes it use SaslAuthenticate, whose answer says the credentials are wrong.
# 2.6 is the newest version aiokafka tells apart: what "auto" finds on any broker since 2.6.
SASL_API_VERSION = "2.6.0"
# TLS alerts by which a broker that requires a client certificate refuses a client without one.
_CLIENT_CERTIFICATE_ALERTS = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "HANDSHAKE_FAILURE")


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


async def start_client(client: Any, connection: KafkaConnection) -> None:
    """Start an aiokafka client within the connect timeout, or stop it and say what to fix.

    aiokafka raises at once when SASL fails, but an unreachable or silent listener costs one
    request timeout per bootstrap host; the bound keeps start-up from hanging either way.
    """
    start = client.bootstrap if hasattr(client, "bootstrap") else client.start
    try:
        async with asyncio.timeout(connection.connect_timeout_s):
            await start()
    except (KafkaError, OSError, TimeoutError) as exc:
        await _close(client)
        raise KafkaConnectError(await _explain(exc, connection)) from exc
    except BaseException:
        await _close(client)
        raise


async def _close(client: Any) -> None:
    close = client.stop if hasattr(client, "stop") else client.close
    # Closing a client whose start failed half-way must not hide why it failed.
    with contextlib.suppress(KafkaError, OSError, TimeoutError):
        await close()


async def _explain(exc: BaseException, connection: KafkaConnection) -> str:
    where = f"Kafka at {connection.describe()}"
    if isinstance(exc, SaslAuthenticationFailed | AuthenticationFailedError):
        return (
            f"{where} refused the credentials ({exc}): check {_KAFKA}SASL_USERNAME and the "
            f"password in {_KAFKA}SASL_PASSWORD_FILE ({connection.password_file})"
        )
    if isinstance(exc, UnsupportedSaslMechanismError):
        return f"{where}: {exc}; check {_KAFKA}SASL_MECHANISM"
    what = (
        f"no answer within {connection.connect_timeout_s:g} s ({_KAFKA}CONNECT_TIMEOUT_S)"
        if isinstance(exc, TimeoutError)
        else _message(exc)
    )
    return f"{where}: {what}; {await _probe(connection)}"


async def _probe(connection: KafkaConnection) -> str:
    """A second look at the first bootstrap host, to tell the operator which setting to check."""
    first = connection.bootstrap_servers.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    host = host.strip("[]")
    context = connection.ssl_context
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(
                host, int(port), ssl=context, server_hostname=host if context else None
            )
            try:
                if context is not None:
                    # A TLS 1.3 server refuses a missing client certificate after the handshake.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):
                            await reader.read(1)
            finally:
                writer.close()
    except ssl.SSLCertVerificationError as err:
        return (
            f"{first} presents a certificate this relay does not trust ({err.verify_message}): "
            f"check {_KAFKA}SSL_CA_FILE"
        )
    except ssl.SSLError as err:
        if any(alert in str(err).upper() for alert in _CLIENT_CERTIFICATE_ALERTS):
            return (
                f"{first} refused the TLS session ({err.reason}); it requires a client "
                f"certificate: check {_KAFKA}SSL_CERT_FILE and {_KAFKA}SSL_KEY_FILE"
            )
        return f"TLS with {first} failed ({err.reason}): check {_KAFKA}SECURITY_PROTOCOL"
    except ConnectionResetError:
        during = " during the TLS handshake" if context is not None else ""
        return f"{first} reset the connection{during}: check {_KAFKA}SECURITY_PROTOCOL"
    except (OSError, TimeoutError, ValueError) as err:
        return (
            f"{first} cannot be reached ({type(err).__name__}: {err}): check "
            f"{_KAFKA}BOOTSTRAP_SERVERS and the network"
        )
    return (
        f"{first} accepts connections but does not speak Kafka as configured: check "
        f"{_KAFKA}SECURITY_PROTOCOL against the listener (TLS or not, SASL or not)"
    )


def _message(exc: BaseException) -> str:
    # aiokafka's errors already start with their class name; OSErrors do not.
    text = str(exc)
    name = type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}"
