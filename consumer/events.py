"""The LSC event contract (v1) as pydantic models.

These models accept exactly what the JSON Schemas in ``schemas/`` accept; a test runs every example
through both. Decoding raw Kafka records (and naming why a record is poison) lives in ``decoding``.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints, model_validator

IDENTIFIER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
DOCUMENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$"

Identifier = Annotated[str, StringConstraints(strict=True, pattern=IDENTIFIER_PATTERN)]
DocumentId = Annotated[str, StringConstraints(strict=True, pattern=DOCUMENT_ID_PATTERN)]
Sha256Hex = Annotated[str, StringConstraints(strict=True, pattern=r"^[0-9a-f]{64}$")]
Label = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=500)]


class Module(StrEnum):
    AG = "ag"
    CONTRATS = "contrats"
    CARNET_ENTRETIEN = "carnet_entretien"
    DIAGNOSTICS = "diagnostics"
    ASSURANCES = "assurances"
    REGLEMENT = "reglement"
    COMPTES = "comptes"
    GED = "ged"


class Audience(StrEnum):
    BUILDING = "building"
    OWNERS = "owners"
    COUNCIL = "council"
    INDIVIDUAL = "individual"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Content(_Frozen):
    media_type: Literal["application/pdf"]
    size_bytes: StrictInt = Field(ge=1)
    sha256: Sha256Hex
    url: Annotated[str, StringConstraints(strict=True, pattern=r"^https?://[^\s]+$")] | None = None
    inline_base64: Annotated[str, StringConstraints(strict=True, min_length=1)] | None = None

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Content:
        if (self.url is None) == (self.inline_base64 is None):
            raise ValueError("content needs exactly one of url or inline_base64")
        return self


class Document(_Frozen):
    id: DocumentId
    module: Module
    category: Label
    title: Label
    document_date: dt.date
    audience: Audience
    content: Content


class DocumentCreated(_Frozen):
    schema_version: Literal[1]
    event_type: Literal["document-created"]
    event_id: Annotated[str, StringConstraints(strict=True, min_length=1, max_length=100)]
    occurred_at: dt.datetime
    agency_id: Identifier
    building_id: Identifier
    document: Document


class ManifestSnapshot(_Frozen):
    schema_version: Literal[1]
    event_type: Literal["manifest-snapshot"]
    snapshot_id: Annotated[str, StringConstraints(strict=True, min_length=1, max_length=100)]
    taken_at: dt.datetime
    agency_id: Identifier
    building_id: Identifier
    modules: Annotated[list[Module], Field(min_length=1)]
    part: StrictInt = Field(ge=1)
    parts: StrictInt = Field(ge=1, le=10_000)
    item_count: StrictInt = Field(ge=0)
    items: tuple[Document, ...]


Event = DocumentCreated | ManifestSnapshot
