"""The LSC event contract (v1) as msgspec structs, read from a record's bytes in one pass.

The structs accept exactly what the JSON Schemas in ``schemas/`` accept; a test runs every example
through both. msgspec validates each value as it parses it and stops at the first violation, so a
refused record costs no more than what was read before it, and an accepted one is compact: frozen
structs with slots, untracked by the garbage collector (they hold no cycles). ``decoding`` turns raw
Kafka records into events; ``poison`` says why a record is not one.
"""

from __future__ import annotations

import datetime as dt
import re
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType
from msgspec.structs import force_setattr

from consumer.core.patterns import (
    DOCUMENT_ID_PATTERN,
    IDENTIFIER_PATTERN,
    SHA256_PATTERN,
    TIMESTAMP_PATTERN,
    URL_MATCHER,
    UUID_PATTERN,
    is_base64,
)

MAX_SAFE_INTEGER: Final = 2**53 - 1
MAX_URL_LENGTH: Final = 2048
_URL: Final = re.compile(URL_MATCHER)
# The years a contract date may have (its pattern starts with [12][0-9]{3}); msgspec reads the
# format and the calendar itself.
_YEARS: Final = range(1000, 3000)


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


class FieldViolationError(ValueError):
    """A value the contract refuses, found by a struct's own check rather than by msgspec's.

    msgspec reports it as a ``ValidationError`` located at the struct, caused by this exception,
    which names the field.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class UnfetchableUrlError(FieldViolationError):
    """A content URL no HTTP client could fetch; ``url`` is the refused value as given."""

    def __init__(self, url: str) -> None:
        super().__init__("url", "Expected a URL the relay can fetch")
        self.url = url


def fetchable(url: str) -> bool:
    """Whether ``url`` is one the contract allows (``URL_PATTERN``, at most 2048 characters)."""
    return len(url) <= MAX_URL_LENGTH and _URL.match(url) is not None


Identifier = Annotated[str, Meta(pattern=IDENTIFIER_PATTERN)]
Uuid = Annotated[str, Meta(pattern=UUID_PATTERN)]
DocumentId = Annotated[str, Meta(pattern=DOCUMENT_ID_PATTERN)]
Sha256Hex = Annotated[str, Meta(pattern=SHA256_PATTERN)]
Label = Annotated[str, Meta(min_length=1, max_length=500, pattern=r"\S")]
# BASE64_PATTERN, checked by ``Content`` itself (``is_base64``): the same meaning, a fifth the time
Base64 = Annotated[str, Meta(min_length=4)]

if TYPE_CHECKING:
    # What readers see. msgspec reads what the contract allows at run time: JSON Schema calls 12.0
    # an integer, and msgspec's own date-time parser accepts forms the contract refuses (a
    # lower-case ``t``, a space, ``+0200``, ten digits of fraction). Each struct's
    # ``__post_init__`` turns an integral float into its int and a timestamp's text into an aware
    # datetime, kept to the microsecond.
    SchemaVersion = Literal[1]
    SizeBytes = int
    PartNumber = int
    ItemCount = int
    Timestamp = dt.datetime
else:

    def _json_integer(ge: int, le: int) -> object:
        return (
            Annotated[int, Meta(ge=ge, le=le)] | Annotated[float, Meta(ge=ge, le=le, multiple_of=1)]
        )

    SchemaVersion = _json_integer(1, 1)
    SizeBytes = _json_integer(1, MAX_SAFE_INTEGER)
    PartNumber = _json_integer(1, 10_000)
    ItemCount = _json_integer(0, 1_000_000)
    Timestamp = Annotated[str, Meta(pattern=TIMESTAMP_PATTERN)]


def _as_int(struct: Struct, name: str) -> None:
    """An integral float read where the contract asks for an integer becomes that integer."""
    value = getattr(struct, name)
    if type(value) is float:
        force_setattr(struct, name, int(value))


def _as_timestamp(struct: Struct, name: str) -> None:
    """A timestamp's text (its pattern checked) becomes the aware datetime it names."""
    value = getattr(struct, name)
    if isinstance(value, str):
        try:
            force_setattr(struct, name, dt.datetime.fromisoformat(value))
        except ValueError:
            raise FieldViolationError(name, "Expected a date-time that exists") from None


class _Frozen(Struct, frozen=True, forbid_unknown_fields=True, gc=False, omit_defaults=True):
    """Immutable (each subclass says so again, for type checkers), every field named by the
    contract, no garbage-collector header: a struct of strings, numbers and dates holds no cycle."""


class Content(_Frozen, frozen=True):
    """The PDF of a document: exactly one of ``url`` and ``inline_base64``, plus its checks."""

    media_type: Literal["application/pdf"]
    size_bytes: SizeBytes
    sha256: Sha256Hex
    # Absent, never null: the contract gives a source as a string or not at all. The URL is
    # checked here, where the refused value can still be named.
    url: str | UnsetType = UNSET
    inline_base64: Base64 | UnsetType = UNSET

    def __post_init__(self) -> None:
        if self.inline_base64 is not UNSET and not is_base64(self.inline_base64):
            raise FieldViolationError("inline_base64", "Expected standard base64 with padding")
        if (self.url is UNSET) == (self.inline_base64 is UNSET):
            raise ValueError("Expected exactly one of `url` and `inline_base64`")
        if self.url is not UNSET and not fetchable(self.url):
            raise UnfetchableUrlError(self.url)
        _as_int(self, "size_bytes")


class Document(_Frozen, frozen=True):
    """One document as LSC describes it, in a document-created event or a manifest item."""

    id: DocumentId
    module: Module
    category: Label
    title: Label
    document_date: dt.date
    audience: Audience
    content: Content

    def __post_init__(self) -> None:
        if self.document_date.year not in _YEARS:
            raise FieldViolationError("document_date", "Expected a date of the years 1000 to 2999")


class _Event(_Frozen, frozen=True, tag_field="event_type"):
    """An event of the contract; ``event_type`` names its kind (the struct's tag)."""


class DocumentCreated(_Event, frozen=True, tag="document-created"):
    """LSC published one document for a building."""

    schema_version: SchemaVersion
    event_id: Uuid
    occurred_at: Timestamp
    agency_id: Identifier
    building_id: Identifier
    document: Document

    def __post_init__(self) -> None:
        _as_int(self, "schema_version")
        _as_timestamp(self, "occurred_at")


class ManifestSnapshot(_Event, frozen=True, tag="manifest-snapshot"):
    """One part of the exhaustive list of what should be published for a building.

    Rules across fields (``part <= parts``, item count, items within ``modules``, unique ids) are
    not part of the schema; ``decoding`` checks them and names the one broken.
    """

    schema_version: SchemaVersion
    snapshot_id: Uuid
    taken_at: Timestamp
    agency_id: Identifier
    building_id: Identifier
    modules: Annotated[tuple[Module, ...], Meta(min_length=1)]
    part: PartNumber
    parts: PartNumber
    item_count: ItemCount
    items: tuple[Document, ...]

    def __post_init__(self) -> None:
        if len(set(self.modules)) != len(self.modules):
            raise FieldViolationError("modules", "Expected modules that do not repeat")
        for name in ("schema_version", "part", "parts", "item_count"):
            _as_int(self, name)
        _as_timestamp(self, "taken_at")


Event = DocumentCreated | ManifestSnapshot

_EVENT_DECODER: Final = msgspec.json.Decoder(Event)
_DOCUMENT_DECODER: Final = msgspec.json.Decoder(Document)


def read_event(value: bytes) -> Event:
    """The event that ``value`` (UTF-8 JSON) is, of the kind its ``event_type`` names.

    Raises ``msgspec.DecodeError`` for bytes that are not JSON, ``msgspec.ValidationError`` for
    JSON that is not an event, naming the first violation and where it is.
    """
    return _EVENT_DECODER.decode(value)


def read_document(value: bytes) -> Document:
    """The document that ``value`` (UTF-8 JSON) is, raising as ``read_event`` does."""
    return _DOCUMENT_DECODER.decode(value)


def as_json(value: Event | Document | Content) -> dict[str, Any]:
    """The JSON object of an event or a part of it, as the contract writes it."""
    written: dict[str, Any] = msgspec.to_builtins(value)
    return written
