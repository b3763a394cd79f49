"""Starting an aiokafka client within a bounded wait, and saying what to fix when it fails.

Every aiokafka client the relay creates is started through ``start_client``. When Kafka refuses or
does not answer, a second look at the first bootstrap host (TCP, TLS, a client certificate asked
for) turns the error into a message naming the setting to check, before any input is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

from aiokafka.errors import (
    AuthenticationFailedError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)

from consumer.errors import KafkaConnectError
from consumer.kafka.connection import KafkaConnection
from consumer.settings import ENV_PREFIX

_KAFKA = f"{ENV_PREFIX}KAFKA__"
_PROBE_TIMEOUT_S = 3.0
# TLS alerts by which a broker that requires a client certificate refuses a client without one.
_CLIENT_CERTIFICATE_ALERTS = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "HANDSHAKE_FAILURE")


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
