"""The sandbox's accounts: which condominia an API key may touch, its rate limit, Basic auth.

An account is what ChouetteCopro's admin gives an agency: one API key (the Basic auth user name,
with an empty password) and the condominia its user has rights on. ``load_accounts`` reads them
from the JSON file ``python -m consumer.local.sandbox --accounts-file`` takes.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

DEMO_API_KEY = "sandbox-demo-key"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Token bucket: ``burst`` requests at once, refilled at ``rate_per_s``."""

    rate_per_s: float
    burst: int


@dataclass(frozen=True, slots=True)
class Account:
    """What one API key may touch, and its own rate limit (the server default when None)."""

    condominia: frozenset[str]
    rate_limit: RateLimit | None = None


def authenticate(request: web.Request, accounts: Mapping[str, Account]) -> tuple[str | None, str]:
    """The request's API key, or None and what is wrong with its Authorization header."""
    header = request.headers.get("Authorization")
    if header is None:
        return None, "send the API key as the Basic auth user name"
    scheme, _, encoded = header.partition(" ")
    not_basic = "the Authorization header is not valid Basic auth"
    if scheme.lower() != "basic":
        return None, not_basic
    try:
        decoded = base64.b64decode(encoded, validate=True).decode()
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        return None, not_basic
    login, colon, password = decoded.partition(":")
    if not colon or password:
        return None, "the Basic auth password must be empty"
    if login not in accounts:
        return None, "unknown API key"
    return login, ""


class _AccountEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    condominia: list[str]
    rate_per_s: float | None = Field(default=None, gt=0)
    burst: int = Field(default=1, ge=1)


_ACCOUNTS_FILE = TypeAdapter(dict[str, list[str] | _AccountEntry])


def load_accounts(path: Path) -> dict[str, Account]:
    """``{"key": ["c-1"]}`` or ``{"key": {"condominia": [...], "rate_per_s": 2, "burst": 5}}``."""
    accounts: dict[str, Account] = {}
    for key, entry in _ACCOUNTS_FILE.validate_json(path.read_bytes()).items():
        if isinstance(entry, list):
            accounts[key] = Account(frozenset(entry))
        else:
            limit = RateLimit(entry.rate_per_s, entry.burst) if entry.rate_per_s else None
            accounts[key] = Account(frozenset(entry.condominia), limit)
    return accounts
