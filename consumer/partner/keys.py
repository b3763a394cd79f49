"""Per-agency ChouetteCopro API keys, read from a mounted Kubernetes Secret.

The Secret is mounted as a directory: one file per agency (file name = agency id, content = key).
Kubernetes adds ``..data`` and timestamped dot-directories for atomic updates; dotfiles are
ignored. Keys stay ``SecretStr`` and never appear in logs, reprs or exception messages: every
partner message passes ``redact``, which knows every form a key takes on the wire.
"""

from __future__ import annotations

import base64
import difflib
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from pydantic import SecretStr

from consumer.core.patterns import IDENTIFIER_PATTERN
from consumer.errors import ConfigError, PartnerParkedError

logger = logging.getLogger(__name__)

_AGENCY_ID = re.compile(IDENTIFIER_PATTERN)
REDACTED = "***"


class Redactor:
    """Replaces every form of the given secrets in a text by ``***``.

    A partner may echo a key raw, in the Basic header it came in (base64 of ``key:``), JSON-
    escaped (``\\/``, ``\\u00e9`` in either case) or URL-encoded (``%2F``, ``+`` for a
    space), and any of those nested in another. One pattern per secret accepts, for each
    character, every way these encodings may write it, so no combination gets through.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if secret:
                forms.add(secret)
                for raw in (f"{secret}:".encode(), secret.encode()):
                    for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
                        forms.add(encoded.decode("ascii"))
                        forms.add(encoded.decode("ascii").rstrip("="))
        # Longest first: a Basic credential is replaced whole, not around a key inside it.
        patterns = [_pattern(form) for form in sorted(forms, key=len, reverse=True)]
        self._pattern = re.compile("|".join(patterns)) if patterns else None

    def redact(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(REDACTED, text)


def _pattern(secret: str) -> str:
    """A regular expression matching ``secret`` in any of its encodings, character by character."""
    return "".join(_character(char) for char in secret)


def _character(char: str) -> str:
    # JSON escapes may be nested (a JSON text quoted inside a JSON string): any run of
    # backslashes may stand before an escaped character, and "%25" before a percent-escape.
    if char == "\\":
        forms = [r"\\+"]
    elif char in '/"':
        forms = [r"\\*" + re.escape(char)]
    else:
        forms = [re.escape(char)]
    code = ord(char)
    if code <= 0xFFFF:
        forms.append(_json_unicode(code))
    else:  # a UTF-16 surrogate pair in JSON
        high, low = 0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)
        forms.append(_json_unicode(high) + _json_unicode(low))
    forms.append("".join(f"%(?:25)*(?i:{byte:02x})" for byte in char.encode()))
    if char == " ":
        forms.append(r"\+")
    return "(?:" + "|".join(forms) + ")"


def _json_unicode(code: int) -> str:
    return rf"\\+u(?i:{code:04x})"


class ApiKeyStore:
    """API keys by agency id; ``reload()`` re-reads the directory (after a Secret rotation)."""

    def __init__(self, directory: Path | None = None) -> None:
        self._directory = directory
        self._keys: dict[str, SecretStr] = {}
        self._redactor = Redactor(())
        if directory is not None:
            self.reload()

    @classmethod
    def from_mapping(cls, keys: Mapping[str, str]) -> ApiKeyStore:
        """A store with fixed keys, for local runs and tests (``reload()`` keeps them)."""
        store = cls()
        store._set({agency: SecretStr(key.strip()) for agency, key in keys.items()})
        return store

    def redact(self, text: str) -> str:
        """``text`` with every form of every key replaced: use it on anything a partner said."""
        return self._redactor.redact(text)

    def _set(self, keys: dict[str, SecretStr]) -> None:
        self._redactor = Redactor(key.get_secret_value() for key in keys.values())
        self._keys = keys

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
        self._set(keys)
        logger.info("loaded API keys for %d agencies", len(keys))

    def agencies(self) -> frozenset[str]:
        return frozenset(self._keys)

    def check_covers(self, agencies: Iterable[str]) -> None:
        """A ``ConfigError`` naming every agency without a key file, and the file meant for it.

        The usual slip is a file named after the key file someone was sent (``agence-lyon.key``)
        where the agency id alone (``agence-lyon``) is the name.
        """
        missing = sorted(set(agencies) - set(self._keys))
        if not missing:
            return
        names = (
            sorted(p.name for p in self._directory.iterdir() if not p.name.startswith("."))
            if self._directory is not None and self._directory.is_dir()
            else []
        )
        problems = []
        for agency in missing:
            problem = f"no API key file for agency {agency} in {self._directory}"
            meant = [n for n in names if n.split(".", 1)[0] == agency] or difflib.get_close_matches(
                agency, names, n=1
            )
            if meant:
                problem += (
                    f": {meant[0]} is there, but the file name must be the agency id alone; "
                    f"rename it {agency} (in a Secret: --from-file={agency}=./{meant[0]})"
                )
            else:
                problem += f": add a file named {agency} holding its ChouetteCopro API key"
            problems.append(problem)
        raise ConfigError("; ".join(problems))

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
