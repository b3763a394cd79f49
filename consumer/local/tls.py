"""Secured listeners for the local broker: a private CA, certificates, and a SCRAM user.

``SecuredListeners.create(directory)`` makes a throw-away CA with ``openssl``, a broker certificate
for 127.0.0.1, a client certificate (its key encrypted, as a TLS user's may be) and a SCRAM user.
``LocalKafka(secured=...)`` then adds a SASL_SSL listener (SCRAM-SHA-512/256 and PLAIN) and an SSL
listener that requires a client certificate, the two ways managed clusters let clients in.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SASL_SSL = "SASL_SSL"
SSL = "SSL"
_DAYS = "2"
_SCRAM = "org.apache.kafka.common.security.scram.ScramLoginModule required;"


class CertificateError(RuntimeError):
    """openssl is missing or refused to make a certificate."""


@dataclass(frozen=True, slots=True)
class Pki:
    """PEM files of a private CA, one broker and one client."""

    ca_file: Path
    broker_keystore: Path  # the broker's private key followed by its certificate chain
    client_cert_file: Path
    client_key_file: Path  # encrypted with the password in client_key_password_file
    client_key_password_file: Path


def make_pki(directory: Path) -> Pki:
    """A CA, a broker certificate for 127.0.0.1/localhost and a client certificate, signed by it."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise CertificateError("the secured local broker needs 'openssl' on PATH")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_file = directory / "ca.key", directory / "ca.pem"
    _openssl(
        openssl,
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-keyout", ca_key, "-out", ca_file, "-days", _DAYS),
        *("-subj", "/CN=chouette-relay local CA"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )
    broker_key, broker_cert = _issue(
        openssl,
        directory,
        "broker",
        ca=(ca_key, ca_file),
        extensions="subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    broker_keystore = directory / "broker-keystore.pem"
    broker_keystore.write_bytes(broker_key.read_bytes() + broker_cert.read_bytes())
    client_key, client_cert = _issue(
        openssl,
        directory,
        "client",
        ca=(ca_key, ca_file),
        extensions="extendedKeyUsage=clientAuth\n",
    )
    password_file = directory / "client-key.password"
    password_file.write_text(secrets.token_hex(12) + "\n", encoding="utf-8")
    encrypted = directory / "client-encrypted.key"
    _openssl(
        openssl,
        *("pkcs8", "-topk8", "-v2", "aes-256-cbc", "-in", client_key, "-out", encrypted),
        *("-passout", f"file:{password_file}"),
    )
    client_key.unlink()
    return Pki(ca_file, broker_keystore, client_cert, encrypted, password_file)


def _issue(
    openssl: str, directory: Path, name: str, *, ca: tuple[Path, Path], extensions: str
) -> tuple[Path, Path]:
    ca_key, ca_file = ca
    key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
    ext_file = directory / f"{name}.ext"
    ext_file.write_text(extensions, encoding="utf-8")
    _openssl(
        openssl,
        *("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-keyout", key, "-out", csr, "-subj", f"/CN=chouette-relay local {name}"),
    )
    _openssl(
        openssl,
        *("x509", "-req", "-in", csr, "-CA", ca_file, "-CAkey", ca_key, "-CAcreateserial"),
        *("-out", cert, "-days", _DAYS, "-extfile", ext_file),
    )
    return key, cert


def _openssl(openssl: str, *arguments: str | Path) -> None:
    result = subprocess.run(  # noqa: S603 - fixed argument list, no shell
        [openssl, *map(str, arguments)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise CertificateError(f"openssl {arguments[0]} failed: {result.stderr.strip()}")


@dataclass(frozen=True, slots=True)
class SecuredListeners:
    """What the secured listeners need: the certificates and the SCRAM (and PLAIN) user."""

    pki: Pki
    username: str
    password_file: Path

    @classmethod
    def create(cls, directory: Path, *, username: str = "relay") -> SecuredListeners:
        password_file = directory / f"{username}.password"
        pki = make_pki(directory)
        password_file.write_text(secrets.token_hex(16) + "\n", encoding="utf-8")
        return cls(pki=pki, username=username, password_file=password_file)

    @property
    def password(self) -> str:
        return self.password_file.read_text(encoding="utf-8").strip()

    def format_arguments(self) -> list[str]:
        """``--add-scram`` arguments of the storage tool: the user exists from the first start."""
        credential = f"[name={self.username},password={self.password}]"
        return [
            argument
            for mechanism in ("SCRAM-SHA-512", "SCRAM-SHA-256")
            for argument in ("--add-scram", f"{mechanism}={credential}")
        ]

    def add_to(self, properties: dict[str, str], *, sasl_port: int, ssl_port: int) -> None:
        """Add both listeners to ``properties``; inter-broker traffic stays on PLAINTEXT."""
        addresses = f"{SASL_SSL}://127.0.0.1:{sasl_port},{SSL}://127.0.0.1:{ssl_port}"
        properties["listeners"] += "," + addresses
        properties["advertised.listeners"] += "," + addresses
        properties["listener.security.protocol.map"] += f",{SASL_SSL}:{SASL_SSL},{SSL}:{SSL}"
        plain = (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'user_{self.username}="{self.password}";'
        )
        sasl, mtls = f"listener.name.{SASL_SSL.lower()}.", f"listener.name.{SSL.lower()}."
        properties.update(
            {
                "ssl.keystore.type": "PEM",
                "ssl.keystore.location": str(self.pki.broker_keystore),
                "ssl.truststore.type": "PEM",
                "ssl.truststore.location": str(self.pki.ca_file),
                f"{sasl}sasl.enabled.mechanisms": "SCRAM-SHA-512,SCRAM-SHA-256,PLAIN",
                f"{sasl}scram-sha-512.sasl.jaas.config": _SCRAM,
                f"{sasl}scram-sha-256.sasl.jaas.config": _SCRAM,
                f"{sasl}plain.sasl.jaas.config": plain,
                f"{mtls}ssl.client.auth": "required",
            }
        )
