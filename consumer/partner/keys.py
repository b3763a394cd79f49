"""Per-agency ChouetteCopro API keys, read from a mounted Kubernetes Secret.

The Secret is mounted as a directory: one file per agency (file name = agency id, content = key).
Kubernetes adds ``..data`` and timestamped dot-directories for atomic updates; dotfiles are
ignored. Keys stay ``SecretStr`` and never appear in logs, reprs or exception messages.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

from pydantic import SecretStr

from consumer.core.events import IDENTIFIER_PATTERN
from consumer.errors import ConfigError, PartnerParkedError

logger = logging.getLogger(__name__)

_AGENCY_ID = re.compile(IDENTIFIER_PATTERN)


class ApiKeyStore:
    """API keys by agency id; ``reload()`` re-reads the directory (after a Secret rotation)."""

    def __init__(self, directory: Path | None = None) -> None:
        self._directory = directory
        self._keys: dict[str, SecretStr] = {}
        if directory is not None:
            self.reload()

    @classmethod
    def from_mapping(cls, keys: Mapping[str, str]) -> ApiKeyStore:
        """A store with fixed keys, for local runs and tests (``reload()`` keeps them)."""
        store = cls()
        store._keys = {agency: SecretStr(key.strip()) for agency, key in keys.items()}
        return store

    def reload(self) -> None:
        """Replace the keys with the directory's content; the old keys stay if reading fails."""
        if self._directory is None:
            return
        if not self._directory.is_dir():
            raise ConfigError(f"API key directory {self._directory} does not exist")
        keys: dict[str, SecretStr] = {}
        for path in sorted(self._directory.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            if not _AGENCY_ID.match(path.name):
                logger.warning("ignoring API key file %s: not an agency id", path.name)
                continue
            try:
                key = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    f"cannot read the API key file of agency {path.name}: {type(exc).__name__}"
                ) from None
            if not key:
                logger.warning("ignoring API key file of agency %s: it is empty", path.name)
                continue
            keys[path.name] = SecretStr(key)
        self._keys = keys
        logger.info("loaded API keys for %d agencies", len(keys))

    def agencies(self) -> frozenset[str]:
        return frozenset(self._keys)

    def get(self, agency_id: str) -> SecretStr | None:
        return self._keys.get(agency_id)

    def require(self, agency_id: str) -> SecretStr:
        """The agency's key, or ``PartnerParkedError`` (an operator must provide it)."""
        key = self._keys.get(agency_id)
        if key is None:
            raise PartnerParkedError(f"no ChouetteCopro API key for agency {agency_id}")
        return key

    def __repr__(self) -> str:
        return f"ApiKeyStore(directory={self._directory!s}, agencies={sorted(self._keys)})"
