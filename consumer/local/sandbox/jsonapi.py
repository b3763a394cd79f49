"""The sandbox's answers in JSON:API form: documents, and error objects as the contract shapes them.

Every answer under ``/api/v1`` is ``application/vnd.api+json``; an error's ``detail`` is cut to a
few hundred characters, and its ``source`` names the JSON pointer or the parameter at fault.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

JSON_API = "application/vnd.api+json"
_MAX_DETAIL = 300


def json_response(
    status: int, payload: Any, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type=JSON_API, headers=headers
    )


def error(
    status: int,
    code: str,
    detail: str,
    *,
    pointer: str | None = None,
    parameter: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return json_response(
        status, {"errors": [error_object(status, code, detail, pointer, parameter)]}, headers
    )


def error_object(
    status: int, code: str, detail: str, pointer: str | None, parameter: str | None
) -> dict[str, Any]:
    error: dict[str, Any] = {
        "status": str(status),
        "code": code,
        "title": HTTPStatus(status).phrase,
        "detail": detail[:_MAX_DETAIL],
    }
    if pointer is not None:
        error["source"] = {"pointer": pointer}
    elif parameter is not None:
        error["source"] = {"parameter": parameter}
    return error
