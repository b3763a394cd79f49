"""Routing: what an operator writes in the routing file, and what the relay makes of it."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from consumer.core.events import Audience, Document, Module
from consumer.core.routing import (
    Action,
    FirstPublication,
    FirstPublicationMode,
    Reason,
    RoutingTable,
    load_routing,
)
from consumer.errors import ConfigError

EXAMPLE = """
[defaults]
rate_per_second = 5.0
burst = 10

[agencies.agence-lyon]
modules = ["ag", "contrats", "carnet_entretien"]
audiences = ["building", "council"]
first_publication = "since:2024-01-01"
rate_per_second = 2.0

[agencies.agence-lyon.condominia]
"bat-12" = "8841"
"bat-13" = 8842

[agencies.agence-nice]
modules = ["ag"]
first_publication = "fresh"
"""


def document(module: str = "ag", audience: str = "building") -> Document:
    return msgspec.convert(
        {
            "id": "evt-1:att-1",
            "module": module,
            "category": "Procès-verbal",
            "title": "AG 2024",
            "document_date": "2024-03-01",
            "audience": audience,
            "content": {
                "media_type": "application/pdf",
                "size_bytes": 1234,
                "sha256": hashlib.sha256(b"pdf").hexdigest(),
                "url": "https://documents.lsc.example/1.pdf",
            },
        },
        type=Document,
    )


def agency(**fields: Any) -> dict[str, Any]:
    return {
        "agencies": {"agence-lyon": {"modules": ["ag"], "first_publication": "history"} | fields}
    }


def config_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        RoutingTable.from_mapping(data)
    return str(caught.value)


@pytest.fixture
def routing(tmp_path: Path) -> RoutingTable:
    path = tmp_path / "routing.toml"
    path.write_text(EXAMPLE, encoding="utf-8")
    return load_routing(path)


def test_the_documented_example_loads_with_defaults_folded_in(routing: RoutingTable) -> None:
    lyon = routing.agencies["agence-lyon"]
    assert lyon.modules == {Module.AG, Module.CONTRATS, Module.CARNET_ENTRETIEN}
    assert lyon.audiences == {Audience.BUILDING, Audience.COUNCIL}
    assert lyon.first_publication == FirstPublication(
        mode=FirstPublicationMode.SINCE, since=dt.date(2024, 1, 1)
    )
    assert (lyon.rate_per_second, lyon.burst) == (2.0, 10)
    assert lyon.condominia == {"bat-12": "8841", "bat-13": "8842"}  # an unquoted id is the same
    nice = routing.agencies["agence-nice"]
    assert nice.audiences == {Audience.BUILDING}
    assert (nice.rate_per_second, nice.burst) == (5.0, 10)


def test_without_defaults_the_rate_is_left_to_the_partner_settings() -> None:
    table = RoutingTable.from_mapping(agency())
    assert table.agencies["agence-lyon"].rate_per_second is None
    assert table.agencies["agence-lyon"].burst is None


def test_forward_goes_to_the_mapped_condominium(routing: RoutingTable) -> None:
    verdict = routing.decide("agence-lyon", "bat-12", document())
    assert (verdict.action, verdict.condominium_id) == (Action.FORWARD, "8841")


@pytest.mark.parametrize(
    ("agency_id", "module", "audience", "reason"),
    [
        ("agence-paris", "ag", "building", Reason.UNKNOWN_AGENCY),
        ("agence-lyon", "comptes", "building", Reason.MODULE_DISABLED),
        ("agence-lyon", "ag", "owners", Reason.AUDIENCE_NOT_FORWARDED),
        ("agence-lyon", "ag", "individual", Reason.INDIVIDUAL_NEVER_FORWARDED),
    ],
)
def test_filtered_documents_say_why(
    routing: RoutingTable, agency_id: str, module: str, audience: str, reason: Reason
) -> None:
    verdict = routing.decide(agency_id, "bat-12", document(module, audience))
    assert (verdict.action, verdict.reason, verdict.condominium_id) == (Action.FILTER, reason, None)


def test_an_unmapped_building_parks_what_would_be_forwarded(routing: RoutingTable) -> None:
    verdict = routing.decide("agence-lyon", "bat-99", document())
    assert (verdict.action, verdict.reason) == (Action.PARK, Reason.UNMAPPED_BUILDING)
    # ... but what routing filters anyway is filtered, not parked
    filtered = routing.decide("agence-lyon", "bat-99", document(audience="individual"))
    assert filtered.action is Action.FILTER


def test_individual_audience_is_refused_in_the_file() -> None:
    message = config_error(agency(audiences=["building", "individual"]))
    assert message.startswith("routing file agencies.agence-lyon.audiences: ")
    assert '"individual" is never forwarded' in message


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"first_publication": "since:2024-13-01"},
            'routing file agencies.agence-lyon.first_publication: "since:2024-13-01" is not a '
            "date; use history, fresh or since:YYYY-MM-DD",
        ),
        (
            {"first_publication": "everything"},
            'routing file agencies.agence-lyon.first_publication: "everything" is not a first '
            "publication mode; use history, fresh or since:YYYY-MM-DD",
        ),
        ({"modules": ["ag", "agenda"]}, 'modules: "agenda" is not a module; use some of ag,'),
        ({"audiences": ["tenants"]}, 'audiences: "tenants" is not an audience;'),
        ({"rate_per_second": 0}, "rate_per_second: 0 is not valid; use a number of partner calls"),
        ({"rate_per_second": "fast"}, 'rate_per_second: "fast" is not valid;'),
        ({"burst": 0}, "burst: 0 is not valid; use a whole number"),
        ({"condominia": {"bat 12": "1"}}, 'condominia: "bat 12" is not an LSC building id'),
        ({"condominia": {"bat-12": ""}}, 'condominia: "bat-12" needs a condominium id'),
        ({"colour": "blue"}, "colour: unknown setting; an agency takes modules, audiences"),
    ],
)
def test_each_mistake_names_agency_field_and_fix(fields: dict[str, Any], expected: str) -> None:
    assert expected in config_error(agency(**fields))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"agencies": {"agence-lyon": {"condominiums": {}}}},
            'agencies.agence-lyon.condominiums: unknown setting (did you mean "condominia"?)',
        ),
        (
            {"agencies": {"agence-lyon": {"rate": 2}}},
            'agencies.agence-lyon.rate: unknown setting (did you mean "rate_per_second"?)',
        ),
        ({"defaults": {"aproval": "auto"}}, 'defaults.aproval: unknown setting (did you mean "a'),
        ({"agency": {}}, 'agency: unknown section (did you mean "agencies"?)'),
    ],
)
def test_a_misspelt_key_is_answered_with_the_one_meant(data: dict[str, Any], expected: str) -> None:
    assert expected in config_error(data)


def test_missing_choices_are_asked_for_not_defaulted() -> None:
    message = config_error({"agencies": {"agence-lyon": {}}})
    assert "agencies.agence-lyon.modules: missing; list the modules to forward" in message
    assert "agencies.agence-lyon.first_publication: missing; choose" in message


def test_file_level_mistakes_are_reported_together() -> None:
    message = config_error({"agencies": {}, "defautls": {}})
    assert message.splitlines() == [
        'routing file defautls: unknown section (did you mean "defaults"?); use [defaults] and '
        "[agencies.<id>]",
        "routing file agencies: no agency configured; add an [agencies.<agency-id>] table",
    ]


def test_an_unreadable_or_broken_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_routing(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[agencies.agence-lyon\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_routing(broken)


@pytest.mark.parametrize(
    ("text", "sends_2023", "sends_2024"),
    [("history", True, True), ("fresh", False, False), ("since:2024-01-01", False, True)],
)
def test_first_publication_modes(text: str, sends_2023: bool, sends_2024: bool) -> None:
    mode = FirstPublication.parse(text)
    assert str(mode) == text
    assert mode.sends(dt.date(2023, 12, 31)) is sends_2023
    assert mode.sends(dt.date(2024, 1, 1)) is sends_2024
