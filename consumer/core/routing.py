"""Per-agency routing: which documents go to ChouetteCopro, where, and how the first one goes.

Loaded once from a TOML file (``[defaults]`` and one ``[agencies.<agency-id>]`` table per agency)
and validated at start-up: every mistake is a ``ConfigError`` naming the agency, the field and the
fix. ``RoutingTable.decide`` is the single place where a document is forwarded, filtered or parked.
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from consumer.core.events import Audience, Document, Module
from consumer.core.patterns import IDENTIFIER_PATTERN
from consumer.errors import ConfigError

_IDENTIFIER = re.compile(IDENTIFIER_PATTERN)
_MODULE_SET = frozenset(module.value for module in Module)
_AUDIENCE_SET = frozenset(audience.value for audience in Audience)
_MODULES = ", ".join(module.value for module in Module)
_AUDIENCES = ", ".join(a.value for a in Audience if a is not Audience.INDIVIDUAL)
_FIRST_PUBLICATION_FIX = "use history, fresh or since:YYYY-MM-DD"
_HINTS = {
    "modules": f'list the modules to forward, e.g. modules = ["ag", "contrats"] ({_MODULES})',
    "first_publication": f"choose how the first publication goes; {_FIRST_PUBLICATION_FIX}",
    "rate_per_second": "use a number of partner calls per second greater than 0, e.g. 2.0",
    "burst": "use a whole number of calls of at least 1, e.g. 10",
    "approval": 'use "operator" (a first publication that sends history waits for approval) or '
    '"auto"',
}
_DEFAULTABLE = ("rate_per_second", "burst", "approval")


class FirstPublicationMode(StrEnum):
    HISTORY = "history"  # backfill everything listed
    SINCE = "since"  # backfill documents dated on or after the date
    FRESH = "fresh"  # record what is listed at cut-over as baseline; only later documents flow


class Approval(StrEnum):
    """Who starts a first publication that sends history (``history``, ``since:``)."""

    OPERATOR = "operator"  # it waits for ``chouette-relay approve AGENCY --plan FINGERPRINT``
    AUTO = "auto"  # it starts as soon as its manifest is read


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FirstPublication(_Frozen):
    """How a building's documents already listed at cut-over are treated."""

    mode: FirstPublicationMode
    since: dt.date | None = None

    @model_validator(mode="after")
    def _since_goes_with_its_mode(self) -> FirstPublication:
        if (self.mode is FirstPublicationMode.SINCE) != (self.since is not None):
            raise ValueError("a since date is required with mode since, and only with it")
        return self

    @classmethod
    def parse(cls, text: str) -> FirstPublication:
        """Read ``history``, ``fresh`` or ``since:YYYY-MM-DD``."""
        if text in (FirstPublicationMode.HISTORY, FirstPublicationMode.FRESH):
            return cls(mode=FirstPublicationMode(text))
        prefix, _, date_text = text.partition(":")
        if prefix != FirstPublicationMode.SINCE:
            raise ValueError(f'"{text}" is not a first publication mode; {_FIRST_PUBLICATION_FIX}')
        try:
            since = dt.date.fromisoformat(date_text)
        except ValueError:
            raise ValueError(f'"{text}" is not a date; {_FIRST_PUBLICATION_FIX}') from None
        return cls(mode=FirstPublicationMode.SINCE, since=since)

    def sends(self, document_date: dt.date) -> bool:
        """Whether a document already listed at cut-over is sent (otherwise it is baseline)."""
        if self.mode is FirstPublicationMode.HISTORY:
            return True
        return self.since is not None and document_date >= self.since

    def __str__(self) -> str:
        return f"since:{self.since}" if self.since is not None else str(self.mode)


class AgencyRouting(_Frozen):
    """One agency's settings, with ``[defaults]`` already folded in."""

    modules: frozenset[Module]
    audiences: frozenset[Audience] = frozenset({Audience.BUILDING})
    first_publication: FirstPublication
    # None: neither the agency nor [defaults] sets it, and the partner settings decide
    rate_per_second: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    burst: int | None = Field(default=None, ge=1)
    condominia: Mapping[str, str] = Field(default_factory=dict)
    approval: Approval = Approval.OPERATOR

    @property
    def needs_approval(self) -> bool:
        """Whether a first publication of this agency waits for an operator's approval."""
        return (
            self.approval is Approval.OPERATOR
            and self.first_publication.mode is not FirstPublicationMode.FRESH
        )

    @field_validator("modules", mode="before")
    @classmethod
    def _read_modules(cls, value: object) -> object:
        if not isinstance(value, list | tuple | set | frozenset):
            return value
        unknown = [item for item in value if not isinstance(item, str) or item not in _MODULE_SET]
        if unknown:
            raise ValueError(f'"{unknown[0]}" is not a module; use some of {_MODULES}')
        return value

    @field_validator("audiences", mode="before")
    @classmethod
    def _read_audiences(cls, value: object) -> object:
        if not isinstance(value, list | tuple | set | frozenset):
            # pydantic reports only ValueError as a validation error; TypeError would escape
            raise ValueError(f"must be a list of audiences among {_AUDIENCES}")  # noqa: TRY004
        if any(item == Audience.INDIVIDUAL for item in value):
            raise ValueError(
                '"individual" is never forwarded: ChouetteCopro is open to every occupant, '
                f"tenants included; remove it and keep some of {_AUDIENCES}"
            )
        unknown = [item for item in value if not isinstance(item, str) or item not in _AUDIENCE_SET]
        if unknown:
            raise ValueError(f'"{unknown[0]}" is not an audience; use some of {_AUDIENCES}')
        return value

    @field_validator("first_publication", mode="before")
    @classmethod
    def _read_first_publication(cls, value: object) -> object:
        return FirstPublication.parse(value) if isinstance(value, str) else value

    @field_validator("condominia", mode="before")
    @classmethod
    def _read_condominia(cls, value: object) -> object:
        if not isinstance(value, Mapping):
            raise ValueError(  # noqa: TRY004 - pydantic reports only ValueError
                "must be a table of LSC building id = ChouetteCopro condominium id"
            )
        mapping: dict[str, str] = {}
        for building, raw in value.items():
            if not isinstance(building, str) or not _IDENTIFIER.match(building):
                raise ValueError(f'"{building}" is not an LSC building id ({IDENTIFIER_PATTERN})')
            # an unquoted number is what people write for an id; it means the same
            is_number = isinstance(raw, int) and not isinstance(raw, bool)
            condominium = str(raw) if is_number else raw
            if not isinstance(condominium, str) or not condominium.strip():
                raise ValueError(f'"{building}" needs a condominium id, e.g. "{building}" = "8841"')
            mapping[building] = condominium
        return mapping


class Action(StrEnum):
    FORWARD = "forward"
    FILTER = "filter"
    PARK = "park"


class Reason(StrEnum):
    UNKNOWN_AGENCY = "unknown_agency"
    MODULE_DISABLED = "module_disabled"
    AUDIENCE_NOT_FORWARDED = "audience_not_forwarded"
    INDIVIDUAL_NEVER_FORWARDED = "individual_never_forwarded"
    UNMAPPED_BUILDING = "unmapped_building"


@dataclass(frozen=True, slots=True)
class Verdict:
    """Forward to ``condominium_id``, filter (never sent) or park (sent once an operator acts)."""

    action: Action
    reason: Reason | None = None
    condominium_id: str | None = None


_FILTERED = {reason: Verdict(Action.FILTER, reason) for reason in Reason}
_PARKED = Verdict(Action.PARK, Reason.UNMAPPED_BUILDING)


class RoutingTable(_Frozen):
    """Every agency the relay serves, by LSC agency id."""

    agencies: Mapping[str, AgencyRouting]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> RoutingTable:
        """Build from the parsed TOML; raises ``ConfigError`` saying what to fix."""
        problems: list[str] = []
        unknown = sorted(set(data) - {"defaults", "agencies"})
        problems += [
            f"{k}: unknown section{_did_you_mean(k, ('defaults', 'agencies'))}; use [defaults] "
            "and [agencies.<id>]"
            for k in unknown
        ]
        defaults = data.get("defaults", {})
        agencies = data.get("agencies", {})
        if not isinstance(defaults, Mapping):
            problems.append("defaults: must be a table with rate_per_second, burst and approval")
            defaults = {}
        problems += [
            f"defaults.{name}: unknown setting{_did_you_mean(name, _DEFAULTABLE)}; [defaults] "
            "takes rate_per_second, burst, approval"
            for name in sorted(set(defaults) - set(_DEFAULTABLE))
        ]
        if not isinstance(agencies, Mapping) or not agencies:
            problems.append("agencies: no agency configured; add an [agencies.<agency-id>] table")
            agencies = {}
        built: dict[str, AgencyRouting] = {}
        for agency_id, raw in agencies.items():
            where = f"agencies.{agency_id}"
            if not _IDENTIFIER.match(agency_id):
                problems.append(f"{where}: not an LSC agency id ({IDENTIFIER_PATTERN})")
            elif not isinstance(raw, Mapping):
                problems.append(f"{where}: must be a table")
            else:
                merged = {k: v for k, v in defaults.items() if k in _DEFAULTABLE}
                try:
                    built[agency_id] = AgencyRouting.model_validate({**merged, **raw})
                except ValidationError as exc:
                    problems += _explain(where, exc)
        if problems:
            raise ConfigError("\n".join(f"routing file {problem}" for problem in problems))
        return cls(agencies=built)

    def agency(self, agency_id: str) -> AgencyRouting | None:
        return self.agencies.get(agency_id)

    def decide(self, agency_id: str, building_id: str, document: Document) -> Verdict:
        """Forward, filter or park one document of one building."""
        agency = self.agencies.get(agency_id)
        if agency is None:
            return _FILTERED[Reason.UNKNOWN_AGENCY]
        if document.audience is Audience.INDIVIDUAL:
            return _FILTERED[Reason.INDIVIDUAL_NEVER_FORWARDED]
        if document.module not in agency.modules:
            return _FILTERED[Reason.MODULE_DISABLED]
        if document.audience not in agency.audiences:
            return _FILTERED[Reason.AUDIENCE_NOT_FORWARDED]
        condominium = agency.condominia.get(building_id)
        if condominium is None:
            return _PARKED
        return Verdict(Action.FORWARD, condominium_id=condominium)


def load_routing(path: Path) -> RoutingTable:
    """Read and validate the routing file."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"routing file {path}: cannot be read ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"routing file {path}: not valid TOML ({exc})") from exc
    return RoutingTable.from_mapping(data)


def _explain(where: str, exc: ValidationError) -> list[str]:
    """Turn pydantic's errors into one line per field that says what to fix."""
    lines = []
    for error in exc.errors(include_url=False):
        field_name = str(error["loc"][0]) if error["loc"] else ""
        location = f"{where}.{field_name}" if field_name else where
        kind = error["type"]
        if kind == "value_error":
            message = str(error["ctx"]["error"]) if "ctx" in error else error["msg"]
        elif kind == "missing":
            message = f"missing; {_HINTS.get(field_name, 'add it')}"
        elif kind == "extra_forbidden":
            message = (
                f"unknown setting{_did_you_mean(field_name, AgencyRouting.model_fields)}; an "
                "agency takes modules, audiences, first_publication, rate_per_second, burst, "
                "approval and condominia"
            )
        else:
            hint = _HINTS.get(field_name, error["msg"])
            message = f"{_show(error.get('input'))} is not valid; {hint}"
        lines.append(f"{location}: {message}")
    return lines


def _show(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean "x"?)`` for the known name closest to a misspelt one, or nothing."""
    names = list(known)
    # "rate" for "rate_per_second": a shortened name is too far for difflib's ratio alone
    close = [k for k in names if k.startswith(name) or name.startswith(k)]
    close = close or difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""
