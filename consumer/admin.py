"""Operator commands against a running relay's admin endpoints (held deletions)."""

from __future__ import annotations

import sys

import aiohttp
import orjson

from consumer.errors import ConfigError
from consumer.settings import Settings


async def call_admin(
    settings: Settings, command: str, *, url: str, agency: str | None, building: str | None
) -> int:
    token = settings.http.admin_token()
    if token is None:
        raise ConfigError("set CHOUETTE_RELAY_HTTP__ADMIN_TOKEN_FILE to the admin token file")
    headers = {"Authorization": f"Bearer {token.get_secret_value()}"}
    base = url.rstrip("/")
    async with aiohttp.ClientSession(headers=headers) as session:
        if command == "held":
            request = session.get(f"{base}/admin/held")
        else:
            request = session.post(f"{base}/admin/held/{agency}/{building}/{command}")
        async with request as response:
            body = await response.read()
    sys.stdout.write(orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0 if response.status == 200 else 1
