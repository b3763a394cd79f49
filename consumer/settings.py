"""Service settings, read once at start-up from the environment and frozen.

Every variable starts with ``CHOUETTE_RELAY_``; nested groups use ``__`` (for instance
``CHOUETTE_RELAY_KAFKA__BOOTSTRAP_SERVERS``). Secrets are never set in the environment: they are
read from files (the admin token, the Kafka SASL password and TLS key password, one API key file
per agency in a mounted directory). A value that cannot work stops start-up with a message naming
the variable and what to fix.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from consumer.errors import ConfigError
from consumer.mounted import read_secret

ENV_PREFIX = "CHOUETTE_RELAY_"
POD_NAME_VARIABLE = "POD_NAME"  # set by the Deployment through the downward API
_HOST_PORT = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
# GSSAPI needs Kerberos libraries and OAUTHBEARER a token provider: neither is offered.
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Group):
    bootstrap_servers: str = Field(
        default="", description="Comma-separated host:port list; empty starts the local broker."
    )
    group_id: str = "chouette-relay"
    client_id: str = "chouette-relay"
    documents_topic: str = "lsc.document-created.v1"
    manifests_topic: str = "lsc.manifest-snapshot.v1"
    state_topic: str = "chouette-relay.published-view.v1"
    dead_letter_topic: str = "chouette-relay.dead-letter.v1"
    commands_topic: str = Field(
        default="chouette-relay.commands.v1",
        description="Operator commands (release/discard held deletions), keyed like the inputs.",
    )
    commands_key_file: Path | None = Field(
        default=None,
        description="File with the key operator commands are signed with (HMAC-SHA256); when "
        "set, replicas refuse commands not signed with it.",
    )
    max_value_bytes: int = Field(default=1_048_576, ge=1024)
    commit_interval_s: float = Field(default=1.0, gt=0)
    max_poll_records: int = Field(default=500, ge=1)
    max_pending_live: int = Field(
        default=20_000,
        ge=1,
        description="Live partner operations waiting per input partition before reading it "
        "pauses (it resumes under half).",
    )
    max_pending_backfill: int = Field(
        default=100_000,
        ge=1,
        description="First-publication operations waiting per input partition before reading "
        "it pauses (it resumes under half): a bound on memory, about 1 kB each.",
    )
    max_pending_total: int = Field(
        default=200_000,
        ge=1,
        description="Partner operations waiting in the whole replica, both lanes and every "
        "partition, before the partitions holding them pause (they resume under half): the "
        "replica's memory budget for queued work, about 1 kB each (200 MB by default).",
    )
    max_pending_inline_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1_048_576,
        description="Inline content (base64) of the uploads waiting in the whole replica, paused "
        "agencies' included, before the partitions holding them pause (they resume under half): "
        "a document's inline PDF may be up to KAFKA__MAX_VALUE_BYTES, which the per-operation "
        "budget does not see.",
    )
    session_timeout_ms: int = Field(default=30_000, ge=6_000)
    unavailable_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="How long the relay waits for an unreachable broker before it stops (exit 1).",
    )
    create_state_topic: bool = Field(
        default=True, description="Create the compacted state topic when it is missing."
    )
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str = ""
    sasl_password_file: Path | None = Field(
        default=None, description="File holding the SASL password (a mounted Secret)."
    )
    ssl_ca_file: Path | None = Field(
        default=None, description="PEM CA bundle of the brokers' certificates (else system CAs)."
    )
    ssl_cert_file: Path | None = Field(
        default=None, description="PEM client certificate (chain) for mutual TLS."
    )
    ssl_key_file: Path | None = Field(default=None, description="PEM private key of that cert.")
    ssl_key_password_file: Path | None = Field(
        default=None, description="File holding the password of an encrypted private key."
    )
    group_instance_id: str | None = Field(
        default_factory=lambda: os.environ.get(POD_NAME_VARIABLE) or None,
        pattern=r"^[A-Za-z0-9._-]{1,249}$",  # what Kafka accepts
        description="Static group membership (KIP-345); defaults to $POD_NAME.",
    )
    connect_timeout_s: float = Field(
        default=30.0, gt=0, le=600, description="Bound on connecting to Kafka at start-up."
    )
    leave_group_on_stop: bool = Field(
        default=True,
        description="On a clean stop, a static member leaves the group (its partitions move at "
        "once); false keeps them waiting for a restart under the same instance id.",
    )

    @field_validator("group_instance_id", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value  # set it empty to opt out of $POD_NAME

    @field_validator("commands_key_file")
    @classmethod
    def _key_readable(cls, value: Path | None) -> Path | None:
        # Checked at start-up: a key that cannot be read would otherwise stop the relay at its
        # first assignment, and make the CLI fail only when it sends.
        if value is not None:
            try:
                read_secret(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_ports(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            if not _HOST_PORT.match(part):
                raise ValueError(f"{part!r} is not host:port (example: kafka-0.kafka:9092)")
        return value.strip()

    def commands_key(self) -> SecretStr | None:
        """The key operator commands are signed with, or None when commands are not signed."""
        if self.commands_key_file is None:
            return None
        try:
            return SecretStr(read_secret(self.commands_key_file))
        except ConfigError as exc:
            raise ConfigError(f"{ENV_PREFIX}KAFKA__COMMANDS_KEY_FILE: {exc}") from None


class PartnerSettings(_Group):
    base_url: str = Field(
        default="", description="ChouetteCopro API root; empty starts the sandbox."
    )
    api_keys_dir: Path | None = Field(
        default=None, description="Directory with one file per agency holding its API key."
    )
    timeout_s: float = Field(default=30.0, gt=0)
    max_answer_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=65_536,
        le=256 * 1024 * 1024,
        description="Largest answer ChouetteCopro may give (JSON:API answers are kilobytes); a "
        "larger one is left unread and its outcome unknown, as a malformed answer is.",
    )
    in_doubt_settle_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="After a create or update that got no answer (a timeout, a lost connection, a "
        "gateway's 502 or 504), how long ChouetteCopro may still carry it out: the document is "
        "looked up by reference, and sent again, only after that.",
    )
    late_copy_checks_s: tuple[float, ...] = Field(
        default=(60.0, 120.0, 240.0, 600.0),
        max_length=16,
        description="When a document was sent again because a lookup after an in-doubt create "
        "found nothing, the times (seconds after it was sent again, increasing) at which it is "
        "looked up again, and any second copy the partner made of the first create withdrawn; "
        "a copy made later than the last is left for an audit. Empty: never looked up again.",
    )
    concurrency: int = Field(default=8, ge=1, le=256)
    window_per_partition: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="Documents whose partner work runs at once per partition; the rest wait "
        "as queued items.",
    )
    default_rate_per_second: float = Field(default=5.0, gt=0)
    default_burst: int = Field(default=5, ge=1)
    breaker_failures: int = Field(
        default=5, ge=1, description="Failures in a row that pause an agency's partner calls."
    )
    breaker_cooldown_s: float = Field(
        default=30.0, gt=0, le=600, description="First pause; doubled after a failed probe."
    )
    ca_file: Path | None = Field(
        default=None, description="PEM CA bundle trusted for ChouetteCopro, besides the system's."
    )

    @field_validator("late_copy_checks_s")
    @classmethod
    def _increasing(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < seconds <= 86_400 for seconds in value):
            raise ValueError("each time must be above 0 and at most 86400 seconds (a day)")
        if any(later <= earlier for earlier, later in itertools.pairwise(value)):
            raise ValueError(
                f"the times must increase, e.g. [60, 120, 240, 600]; got {list(value)}"
            )
        return value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not re.match(r"^https?://[^\s/]+(/\S*)?$", value):
            raise ValueError(
                f"{value!r} is not an http(s) URL such as https://app.chouettecopro.com/api/v1"
            )
        return value.rstrip("/")


class ContentSettings(_Group):
    ca_file: Path | None = Field(
        default=None, description="PEM CA bundle trusted for document URLs, besides the system's."
    )
    allowed_hosts: tuple[str, ...] = Field(
        default=(), description="Hosts (optionally host:port) that document URLs may point to."
    )
    max_bytes: int = Field(default=50 * 1024 * 1024, ge=1024)
    fetch_timeout_s: float = Field(default=60.0, gt=0)
    in_hand_per_agency: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Documents of one agency whose bytes are held at once: downloading, or "
        "downloaded and not yet through their partner request. Fetched before a partner slot is "
        "taken, so a slow store holds back only its own agency; backfill holds all but a quarter "
        "of them; memory is at most this many documents per agency sending.",
    )
    unavailable_attempts: int = Field(
        default=8, ge=1, le=100, description="Fetches of unavailable content before parking."
    )
    unavailable_backoff_s: float = Field(
        default=5.0, gt=0, le=300, description="First pause between them; doubled, capped at 300."
    )


class ManifestSettings(_Group):
    expiry_s: float = Field(
        default=3600.0, gt=0, description="Incomplete snapshots expire this long after publication."
    )
    max_pending_items: int = Field(default=500_000, ge=1)
    max_clock_skew_s: float = Field(
        default=300.0,
        ge=0,
        le=86_400,
        description="Events dated later than the relay's clock plus this are dead-lettered.",
    )


class GuardSettings(_Group):
    max_delete_share: float = Field(default=0.2, gt=0, le=1)
    min_deletes: int = Field(default=10, ge=1)


class AuditSettings(_Group):
    # The audit's list requests share the agency's limiter with uploads and withdrawals; this
    # bounds the audit's part of it, so an audit never slows a first publication by more.
    rate_share: float = Field(
        default=0.2,
        gt=0,
        le=1,
        description="Share of an agency's partner rate an audit may use (0 < share <= 1).",
    )


class HttpSettings(_Group):
    host: str = "0.0.0.0"  # noqa: S104 - the pod's port must be reachable by probes and Prometheus
    port: int = Field(default=8080, ge=0, le=65535)
    admin_token_file: Path | None = None

    def admin_token(self) -> SecretStr | None:
        """The bearer token of the admin actions, or None when they are disabled.

        A file that is missing, unreadable or empty is a ``ConfigError`` naming the variable.
        """
        if self.admin_token_file is None:
            return None
        try:
            token = read_secret(self.admin_token_file).strip()
        except ConfigError as exc:
            raise ConfigError(f"{ENV_PREFIX}HTTP__ADMIN_TOKEN_FILE: {exc}") from None
        if not token:
            raise ConfigError(
                f"{ENV_PREFIX}HTTP__ADMIN_TOKEN_FILE: {self.admin_token_file} is empty"
            )
        return SecretStr(token)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)  # reads $POD_NAME when built
    partner: PartnerSettings = PartnerSettings()
    content: ContentSettings = ContentSettings()
    manifest: ManifestSettings = ManifestSettings()
    guard: GuardSettings = GuardSettings()
    audit: AuditSettings = AuditSettings()
    http: HttpSettings = HttpSettings()
    routing_file: Path | None = Field(
        default=None, description="TOML file with per-agency routing."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # auto: JSON when stdout is not a terminal (a container), the console format when it is.
    log_format: Literal["auto", "json", "text"] = "auto"
    drain_timeout_s: Annotated[float, Field(gt=0)] = 20.0

    @property
    def is_local(self) -> bool:
        """No broker and no partner configured: run on the embedded local default."""
        return not self.kafka.bootstrap_servers and not self.partner.base_url

    def check_complete(self) -> None:
        """Refuse half-configured production settings with a message that says what to fix."""
        if self.is_local:
            if self.kafka.security_protocol != "PLAINTEXT":
                raise ConfigError(
                    f"{ENV_PREFIX}KAFKA__SECURITY_PROTOCOL is {self.kafka.security_protocol} but "
                    f"{ENV_PREFIX}KAFKA__BOOTSTRAP_SERVERS is not set (the local default broker "
                    "is plaintext)"
                )
            return
        missing = [
            f"{ENV_PREFIX}{name}"
            for name, value in (
                ("KAFKA__BOOTSTRAP_SERVERS", self.kafka.bootstrap_servers),
                ("PARTNER__BASE_URL", self.partner.base_url),
                ("PARTNER__API_KEYS_DIR", self.partner.api_keys_dir),
                ("ROUTING_FILE", self.routing_file),
            )
            if not value
        ]
        if missing:
            raise ConfigError(
                "incomplete configuration: set "
                + ", ".join(missing)
                + " (or set none of the Kafka and partner settings to run the local default)"
            )
        for name, path in (
            ("PARTNER__API_KEYS_DIR", self.partner.api_keys_dir),
            ("ROUTING_FILE", self.routing_file),
        ):
            if path is not None and not path.exists():
                raise ConfigError(f"{ENV_PREFIX}{name}: {path} does not exist")

    def masked(self) -> dict[str, Any]:
        """The effective settings for the start-up log line.

        Secrets are settings only as file paths, never as values; a ``SecretStr`` field, should one
        be added, dumps as asterisks.
        """
        return self.model_dump(mode="json")


def load_settings(**overrides: Any) -> Settings:
    """Read and validate settings; any problem becomes one ``ConfigError`` naming the variables."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            variable = ENV_PREFIX + "__".join(str(part).upper() for part in error["loc"])
            problems.append(f"{variable}: {error['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
    settings.check_complete()
    return settings
