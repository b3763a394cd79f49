"""The LSC event contract (v1) as pydantic models.

These models accept exactly what the JSON Schemas in ``schemas/`` accept when given the output of a
JSON parser (``orjson.loads``) in strict python mode; a test runs every example through both.
Given the bytes themselves (JSON mode, which decoding tries first) no Python validator runs: dates,
date-times, integers and "exactly one content source" are checked in pydantic's Rust core and may
be refused where python mode accepts, never the other way round. Decoding raw Kafka records lives
in ``decoding``, naming why a record is poison in ``poison``. Kept whole (a little over 300
lines): it is the contract's one set of models, read side by side with the schemas.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Final, Literal, cast

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    SerializerFunctionWrapHandler,
    Strict,
    StringConstraints,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError, core_schema

from consumer.core.patterns import (
    BASE64_PATTERN,
    DATE_PATTERN,
    DOCUMENT_ID_PATTERN,
    IDENTIFIER_PATTERN,
    SHA256_PATTERN,
    TIMESTAMP_PATTERN,
    URL_PATTERN,
    UUID_PATTERN,
    for_rust,
)

MAX_SAFE_INTEGER: Final = 2**53 - 1


_DATE_RE: Final = re.compile(DATE_PATTERN)
_TIMESTAMP_RE: Final = re.compile(TIMESTAMP_PATTERN)


def _json_integer(value: object) -> object:
    """Read a JSON integer the way JSON Schema does: 12.0 is the integer 12, true is no integer."""
    if isinstance(value, bool):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _calendar_date(value: object) -> object:
    """Accept a ``YYYY-MM-DD`` string (or a ``date`` built in Python), nothing else."""
    if type(value) is dt.date:
        return value
    if not isinstance(value, str) or _DATE_RE.match(value) is None:
        raise PydanticCustomError("date_type", "Input should be a date string YYYY-MM-DD")
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise PydanticCustomError(
            "date_from_string", "Input should be a date that exists"
        ) from None


def _rfc3339_timestamp(value: object) -> object:
    """Accept an RFC 3339 date-time string with an offset (or an aware ``datetime``)."""
    if isinstance(value, dt.datetime) and value.utcoffset() is not None:
        return value
    if not isinstance(value, str) or _TIMESTAMP_RE.match(value) is None:
        raise PydanticCustomError(
            "datetime_type",
            "Input should be an RFC 3339 date-time with an offset, like 2024-05-06T07:08:09Z",
        )
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:
        raise PydanticCustomError(
            "datetime_from_string", "Input should be a date-time that exists"
        ) from None


def _unique_modules(modules: tuple[Module, ...]) -> tuple[Module, ...]:
    if len(set(modules)) != len(modules):
        raise PydanticCustomError("unique_items", "Modules should not repeat")
    return modules


@dataclass(frozen=True, slots=True)
class _FromJson:
    """Validate JSON input (decoding's one pass over a record's bytes) with ``schema``, all in
    pydantic's Rust core; python input keeps the validators annotated before this marker.

    ``schema`` may refuse more than they do (decoding then takes its checked path), never less.
    """

    schema: core_schema.CoreSchema

    def __get_pydantic_core_schema__(
        self, source: object, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.json_or_python_schema(
            json_schema=self.schema, python_schema=handler(source)
        )


class _NotNull:
    """An optional field that may be absent but not null: the schemas say "string" only."""

    def __get_pydantic_core_schema__(
        self, source: object, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        schema = handler(source)
        return schema["schema"] if schema["type"] == "nullable" else schema


def _text_as(pattern: str, schema: core_schema.CoreSchema) -> core_schema.CoreSchema:
    """A string matching ``pattern``, then read as ``schema`` (a date or a date-time)."""
    return core_schema.chain_schema(
        [core_schema.str_schema(pattern=for_rust(pattern), strict=True), schema]
    )


JsonInt = Annotated[int, BeforeValidator(_json_integer)]


def _json_int(ge: int, le: int) -> _FromJson:
    """A ``JsonInt``'s bounds for JSON input, checked in the Rust core; Python only reads the
    rare integral float (``12.0``), which no integer token matched."""
    exact = core_schema.int_schema(strict=True, ge=ge, le=le)
    return _FromJson(
        core_schema.union_schema(
            [exact, core_schema.no_info_before_validator_function(_json_integer, exact)],
            mode="left_to_right",
        )
    )


# JSON true is no integer; pydantic's literal check would take it for 1.
SchemaVersion = Annotated[
    Literal[1],
    BeforeValidator(_json_integer),
    _FromJson(core_schema.int_schema(strict=True, ge=1, le=1)),
]
CalendarDate = Annotated[
    dt.date,
    BeforeValidator(_calendar_date),
    _FromJson(_text_as(DATE_PATTERN, core_schema.date_schema(strict=False))),
]
Timestamp = Annotated[
    dt.datetime,
    BeforeValidator(_rfc3339_timestamp),
    _FromJson(_text_as(TIMESTAMP_PATTERN, core_schema.datetime_schema(strict=False))),
]
Identifier = Annotated[str, StringConstraints(pattern=for_rust(IDENTIFIER_PATTERN))]
Uuid = Annotated[str, StringConstraints(pattern=for_rust(UUID_PATTERN))]
DocumentId = Annotated[str, StringConstraints(pattern=for_rust(DOCUMENT_ID_PATTERN))]
Sha256Hex = Annotated[str, StringConstraints(pattern=for_rust(SHA256_PATTERN))]
Label = Annotated[str, StringConstraints(min_length=1, max_length=500, pattern=for_rust(r"\S"))]
Url = Annotated[str, StringConstraints(max_length=2048, pattern=for_rust(URL_PATTERN))]
Base64 = Annotated[str, StringConstraints(min_length=4, pattern=for_rust(BASE64_PATTERN))]


class Module(StrEnum):
    """An LSC module; agencies enable forwarding per module and manifests cover a set of them."""

    AG = "ag"
    CONTRATS = "contrats"
    CARNET_ENTRETIEN = "carnet_entretien"
    DIAGNOSTICS = "diagnostics"
    ASSURANCES = "assurances"
    REGLEMENT = "reglement"
    COMPTES = "comptes"
    GED = "ged"


class Audience(StrEnum):
    """Who may read a document. ``individual`` is never forwarded."""

    BUILDING = "building"
    OWNERS = "owners"
    COUNCIL = "council"
    INDIVIDUAL = "individual"


# Enums and tuples are validated in lax mode: strict python mode would demand enum members and
# tuple instances, which a JSON parser never produces. Their items stay strict.
ModuleField = Annotated[Module, Strict(False)]
AudienceField = Annotated[Audience, Strict(False)]


class _Frozen(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        # Field names repeat in every event, values hardly ever: caching those costs more.
        cache_strings="keys",
    )


class Content(_Frozen):
    """The PDF of a document: exactly one of ``url`` and ``inline_base64``, plus its checks."""

    media_type: Literal["application/pdf"]
    size_bytes: Annotated[JsonInt, _json_int(1, MAX_SAFE_INTEGER)] = Field(
        ge=1, le=MAX_SAFE_INTEGER
    )
    sha256: Sha256Hex
    url: Annotated[Url | None, _NotNull()] = None
    inline_base64: Annotated[Base64 | None, _NotNull()] = None

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Content:
        # Python input only: JSON input is held to it by the schema of ``_one_source_in_json``.
        if (self.url is None) == (self.inline_base64 is None):
            raise ValueError("content needs exactly one of url or inline_base64")
        return self

    @model_serializer(mode="wrap")
    def _omit_absent_source(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        # Dumps must validate again: the source not given is left out, not written as null.
        data: dict[str, object] = handler(self)
        return {name: value for name, value in data.items() if value is not None}


# No value passes: a field of this schema may only be absent (and then takes its default).
_ABSENT: Final = core_schema.int_schema(strict=True, ge=1, le=0)


def _one_source_in_json() -> core_schema.CoreSchema:
    """``Content`` for JSON input: a union of its fields with ``url`` alone and with
    ``inline_base64`` alone, so the Rust core holds it to exactly one source, no Python runs.
    """
    # Content's schema as pydantic builds it: its after-validator around the model's fields.
    after = Content.__pydantic_core_schema__
    if after["type"] != "function-after":
        raise TypeError("Content's schema no longer ends in its after-validator")
    model = after["schema"]
    if model["type"] != "model":
        raise TypeError("Content's schema no longer wraps a model")
    fields = model["schema"]
    if fields["type"] != "model-fields":
        raise TypeError("Content's model schema no longer holds its fields")

    def alone(given: str, absent: str) -> core_schema.ModelFieldsSchema:
        chosen = dict(fields["fields"])
        optional = chosen[given]["schema"]
        if optional["type"] != "default":
            raise TypeError(f"Content.{given} is no longer optional")
        chosen[given] = {**chosen[given], "schema": optional["schema"]}
        chosen[absent] = {
            **chosen[absent],
            "schema": core_schema.with_default_schema(_ABSENT, default=None),
        }
        return cast(core_schema.ModelFieldsSchema, {**fields, "fields": chosen})

    union = core_schema.union_schema(
        [alone("url", "inline_base64"), alone("inline_base64", "url")], mode="left_to_right"
    )
    return cast(core_schema.ModelSchema, {**model, "schema": union})


class Document(_Frozen):
    """One document as LSC describes it, in a document-created event or a manifest item."""

    id: DocumentId
    module: ModuleField
    category: Label
    title: Label
    document_date: CalendarDate
    audience: AudienceField
    content: Annotated[Content, _FromJson(_one_source_in_json())]


class DocumentCreated(_Frozen):
    """LSC published one document for a building."""

    schema_version: SchemaVersion
    event_type: Literal["document-created"]
    event_id: Uuid
    occurred_at: Timestamp
    agency_id: Identifier
    building_id: Identifier
    document: Document


class ManifestSnapshot(_Frozen):
    """One part of the exhaustive list of what should be published for a building.

    Rules across fields (``part <= parts``, item count, items within ``modules``, unique ids) are
    not part of the schema; ``decoding`` checks them and names the one broken.
    """

    schema_version: SchemaVersion
    event_type: Literal["manifest-snapshot"]
    snapshot_id: Uuid
    taken_at: Timestamp
    agency_id: Identifier
    building_id: Identifier
    modules: Annotated[
        tuple[ModuleField, ...], Strict(False), Field(min_length=1), AfterValidator(_unique_modules)
    ]
    part: Annotated[JsonInt, _json_int(1, 10_000)] = Field(ge=1, le=10_000)
    parts: Annotated[JsonInt, _json_int(1, 10_000)] = Field(ge=1, le=10_000)
    item_count: Annotated[JsonInt, _json_int(0, 1_000_000)] = Field(ge=0, le=1_000_000)
    items: Annotated[tuple[Document, ...], Strict(False)]


Event = DocumentCreated | ManifestSnapshot
