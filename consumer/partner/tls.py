"""TLS for the HTTPS servers the partner edge calls: ChouetteCopro and the LSC document store.

Both take an ``ssl.SSLContext``: the system CAs plus an optional CA bundle (a corporate proxy's
CA), checked at start-up with a message naming the setting; verification is never turned off.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from consumer.errors import ConfigError
from consumer.mounted import unreadable
from consumer.settings import ENV_PREFIX


def https_context(ca_file: Path | None, variable: str) -> ssl.SSLContext | None:
    """The system CAs plus ``ca_file`` (a corporate proxy's CA), or None for aiohttp's default.

    Verification stays on either way; ``variable`` names the setting in error messages.
    """
    if ca_file is None:
        return None
    if problem := unreadable(ca_file):
        raise ConfigError(f"{ENV_PREFIX}{variable}: {problem}")
    context = ssl.create_default_context()
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{ENV_PREFIX}{variable}: {ca_file} holds no usable PEM certificate ({exc})"
        ) from None
    return context
