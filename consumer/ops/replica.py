"""One replica's ops server, asked by the CLI's ``--replica URL``: its status, or an audit it runs.

Every request carries the admin token (``HTTP__ADMIN_TOKEN_FILE``), which the replica checks, so
a wrong token is said at the first command rather than at the first action. Whatever goes wrong
on the way (a wrong URL, nothing listening, a refused token, another server answering) is a
``ReplicaError`` of one line that names what to fix.
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp
from yarl import URL

from consumer.errors import ConfigError
from consumer.settings import ENV_PREFIX, Settings

_TOKEN_VARIABLE = f"{ENV_PREFIX}HTTP__ADMIN_TOKEN_FILE"
# How an operator outside the cluster reaches a pod: the prod NetworkPolicy lets in only
# Prometheus' namespace, and port-forward goes through the API server, not the pod network.
REACH_HINT = (
    "a replica's ops port is reached with `kubectl -n kafka port-forward pod/POD 8080` and "
    "--replica http://localhost:8080"
)


class ReplicaError(ValueError):
    """The replica could not be asked, or refused: the message says what to fix."""


async def replica_status(settings: Settings, url: str) -> dict[str, Any]:
    """The replica's ``/admin/status``: its breakers and the first publications it holds."""
    return await _ask(settings, url, "GET", "/admin/status", what="status", timeout_s=10)


async def replica_audit(
    settings: Settings, url: str, *, agency: str, building: str | None, repair: bool
) -> dict[str, Any]:
    """The audit run by the replica (``GET /admin/audit``, ``POST /admin/audit/repair``)."""
    query = {"agency": agency, **({"building": building} if building else {})}
    # An audit lists every document of the agency at a share of its rate: minutes, not seconds.
    return await _ask(
        settings,
        url,
        "POST" if repair else "GET",
        "/admin/audit/repair" if repair else "/admin/audit",
        query=query,
        what="audit",
        timeout_s=None,
    )


async def _ask(
    settings: Settings,
    url: str,
    method: str,
    path: str,
    *,
    what: str,
    timeout_s: float | None,
    query: dict[str, str] | None = None,
) -> dict[str, Any]:
    token = settings.http.admin_token()
    if token is None:
        raise ConfigError(
            f"set {_TOKEN_VARIABLE} to the replicas' admin token file to use --replica"
        )
    base = _base_url(url)
    headers = {"Authorization": f"Bearer {token.get_secret_value()}"}
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=10)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(
                method, base / path.lstrip("/"), params=query, headers=headers
            ) as answer,
        ):
            body = await _json_object(answer)
    except aiohttp.ClientConnectorError as exc:
        number = exc.os_error.errno
        # asyncio words a refusal "Connect call failed (...)"; the errno's own text says it
        reason = os.strerror(number) if number and number > 0 else str(exc.os_error.strerror)
        raise ReplicaError(
            f"cannot reach the replica at {url} ({reason.lower()}): check --replica; {REACH_HINT}"
        ) from None
    except TimeoutError:
        raise ReplicaError(
            f"the replica at {url} did not answer within {timeout_s or 10:g} s: check --replica; "
            f"{REACH_HINT}"
        ) from None
    except aiohttp.ClientError as exc:
        raise ReplicaError(
            f"the replica at {url} broke off the {what} ({type(exc).__name__}): try again"
        ) from None
    if answer.status == 401:
        raise ReplicaError(
            f"the replica at {url} refused the admin token: {_TOKEN_VARIABLE} must name the file "
            "of the token the replicas were started with"
        )
    if answer.status == 403:
        raise ReplicaError(
            f"the replica at {url} has its admin actions disabled: it was started without "
            f"{_TOKEN_VARIABLE}"
        )
    if answer.status == 404 and path == "/admin/status":
        raise ReplicaError(
            f"the server at {url} has no {path}: if it is a relay's ops port, that relay is older "
            "than this command; leave out --replica until it is upgraded"
        )
    if body is None:
        raise ReplicaError(
            f"the answer of {url} is not the relay's (HTTP {answer.status}, "
            f"{answer.content_type}): is --replica the ops port of a relay? {REACH_HINT}"
        )
    if answer.status >= 400:
        error = body.get("error")
        raise ReplicaError(
            f"the replica refused the {what} (HTTP {answer.status}): {error or 'no reason given'}"
        )
    return body


def _base_url(url: str) -> URL:
    try:
        parsed = URL(url)
    except ValueError:
        parsed = URL()  # "http://[::1" and the like: said below like any other non-URL
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ReplicaError(
            f"--replica {url!r} is not a replica's URL such as http://localhost:8080; {REACH_HINT}"
        )
    return parsed.with_path(parsed.path.rstrip("/") or "/")


async def _json_object(answer: aiohttp.ClientResponse) -> dict[str, Any] | None:
    """The answer's JSON object, or None when it is something else (another server)."""
    try:
        body = await answer.json(content_type=None)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None
