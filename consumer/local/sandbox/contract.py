"""The sandbox's check of every API request against ``schemas/chouettecopro.openapi.yaml``.

openapi-core validates the path, the parameters and the body (multipart included) and hands back
the unmarshalled values as a ``Call``; a request the contract refuses gets the JSON:API answer the
partner would give (404, 405 or 422 naming the bad value). openapi-core is in the ``local`` extra.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from consumer.errors import ConfigError
from consumer.local.sandbox.accounts import Account
from consumer.local.sandbox.jsonapi import error, error_object, json_response

try:
    from openapi_core import Config, OpenAPI
    from openapi_core.datatypes import RequestParameters
    from openapi_core.templating.paths.exceptions import OperationNotFound, PathNotFound
    from openapi_core.validation.request.exceptions import ParameterValidationError
    from openapi_core.validation.schemas.exceptions import InvalidSchemaValue
except ModuleNotFoundError as missing:
    # The production image leaves the `local` extra out; say so instead of a bare import error.
    raise ConfigError(
        f"the embedded local default (used when neither CHOUETTE_RELAY_KAFKA__BOOTSTRAP_SERVERS "
        f"nor CHOUETTE_RELAY_PARTNER__BASE_URL is set) needs the 'local' extra, and "
        f"{missing.name} is not installed: set the Kafka and partner settings to run against a "
        f"real cluster, or install the extra (`make install` in a checkout, or "
        f"pip install 'chouette-relay[local]')"
    ) from missing

SCHEMA_PATH = Path(__file__).resolve().parents[3] / "schemas" / "chouettecopro.openapi.yaml"


@dataclass(frozen=True, slots=True)
class Call:
    """A request the contract accepted: whose key, and its unmarshalled path, query and body."""

    api_key: str
    account: Account
    path: Mapping[str, Any]
    query: Mapping[str, Any]
    body: Any


Handler = Callable[[web.Request, Call], Awaitable[web.Response]]


class OpenAPIRequest:
    """An aiohttp request as openapi-core reads it (with the boundary the contrib class drops)."""

    def __init__(self, request: web.Request, body: bytes | None) -> None:
        self.parameters = RequestParameters(
            query=request.query, header=request.headers, cookie=request.cookies
        )
        self.method = request.method.lower()
        # No port: matches the contract's "{scheme}://{host}/api/v1" server.
        self.host_url = f"{request.url.scheme}://{request.url.host}"
        self.path = request.path
        self.body = body
        self.content_type = request.headers.get("Content-Type", "")


def _pdf_as_text(value: bytes, **parameters: str) -> str:
    # The contract types the file part as a string (OpenAPI 3.1 style); latin-1 maps every byte
    # to one character, so the handler gets the exact bytes back with .encode("latin-1").
    return value.decode("latin-1")


@functools.cache
def load_contract(path: Path) -> OpenAPI:
    config = Config(extra_media_type_deserializers={"application/pdf": _pdf_as_text})
    return OpenAPI.from_file_path(str(path), config=config)


def contract_violation(violation: Exception) -> web.Response:
    """The JSON:API answer to a request that the OpenAPI contract refuses."""
    if isinstance(violation, PathNotFound):
        return error(404, "not_found", "no such endpoint in the contract")
    if isinstance(violation, OperationNotFound):
        return error(405, "method_not_allowed", str(violation))
    parameter = violation.name if isinstance(violation, ParameterValidationError) else None
    cause = violation.__cause__
    if not isinstance(cause, InvalidSchemaValue):
        return error(422, "invalid_request", str(violation), parameter=parameter)
    errors = []
    for schema_error in cause.schema_errors:
        # jsonschema's ValidationError (untyped): message and the path of the bad value
        detail = str(getattr(schema_error, "message", schema_error))
        path = getattr(schema_error, "absolute_path", ())
        pointer = "".join(f"/{part}" for part in path) if parameter is None else None
        errors.append(error_object(422, "invalid_request", detail, pointer, parameter))
    return json_response(422, {"errors": errors})
