"""Files an operator mounts (secrets, CA bundles), read with a message that says what is wrong.

Shared by the Kafka edge (SASL password, key password) and the partner edge (CA bundles of the
HTTPS servers it calls), so that neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

from consumer.errors import ConfigError


def read_secret(path: Path) -> str:
    """A secret mounted as a file; a trailing newline is not part of it."""
    if problem := unreadable(path):
        raise ConfigError(problem)
    value = path.read_text(encoding="utf-8").rstrip("\r\n")
    if not value:
        raise ConfigError(f"{path} is empty")
    return value


def unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be read, or None when it can."""
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or exc})"
    return None
