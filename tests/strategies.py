"""Hypothesis strategies for valid v1 events, as the JSON objects LSC would publish.

Every dict drawn here validates against its JSON Schema and decodes to an event (not to poison):
manifest parts respect numbering, item counts, module scope and unique ids. Pass ``agency_id`` /
``building_id`` to keep a test on one building, ``modules`` to keep documents in a scope.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st

from consumer.core.events import Audience, Module

JsonObject = dict[str, Any]

_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_NOT_ONLY_WHITESPACE = re.compile(r"\S")


def identifiers() -> st.SearchStrategy[str]:
    """Agency and building ids: ASCII letters, digits, ``_.-``, starting with a letter or digit."""
    return st.builds(
        str.__add__,
        st.sampled_from(_ALNUM),
        st.text(alphabet=_ALNUM + "_.-", max_size=15),
    )


def document_ids() -> st.SearchStrategy[str]:
    """LSC document ids, which may contain ``:`` (event id and attachment id)."""
    return st.builds(
        str.__add__,
        st.sampled_from(_ALNUM),
        st.text(alphabet=_ALNUM + "_.:-", max_size=40),
    )


def timestamps() -> st.SearchStrategy[str]:
    """RFC 3339 date-times as LSC may write them: ``Z`` or an offset, 0 to 9 fraction digits."""
    offsets = st.one_of(
        st.just("Z"),
        st.builds(
            lambda sign, minutes: f"{sign}{minutes // 60:02d}:{minutes % 60:02d}",
            st.sampled_from("+-"),
            st.integers(min_value=0, max_value=23 * 60 + 59),
        ),
    )
    fractions = st.one_of(st.just(""), st.from_regex(r"\.[0-9]{1,9}", fullmatch=True))
    return st.builds(
        lambda moment, fraction, offset: f"{moment:%Y-%m-%dT%H:%M:%S}{fraction}{offset}",
        st.datetimes(min_value=dt.datetime(1990, 1, 1), max_value=dt.datetime(2099, 12, 31)),
        fractions,
        offsets,
    )


def calendar_dates() -> st.SearchStrategy[str]:
    """``YYYY-MM-DD`` strings."""
    return st.dates(min_value=dt.date(1950, 1, 1), max_value=dt.date(2099, 12, 31)).map(
        dt.date.isoformat
    )


def labels() -> st.SearchStrategy[str]:
    """Category and title text: any Unicode (no surrogates), not only whitespace."""
    return st.text(st.characters(codec="utf-8"), min_size=1, max_size=60).filter(
        lambda text: _NOT_ONLY_WHITESPACE.search(text) is not None
    )


def content_dicts() -> st.SearchStrategy[JsonObject]:
    """Content given by URL (any size) or inline (a few bytes, with matching size and sha256)."""
    by_url = st.builds(
        lambda size, digest, path: {
            "media_type": "application/pdf",
            "size_bytes": size,
            "sha256": digest.hex(),
            "url": f"https://documents.lsc.example/{path}.pdf",
        },
        st.integers(min_value=1, max_value=200_000_000),
        st.binary(min_size=32, max_size=32),
        st.text(alphabet=_ALNUM + "-_/", min_size=1, max_size=30),
    )
    inline = st.binary(min_size=1, max_size=64).map(
        lambda data: {
            "media_type": "application/pdf",
            "size_bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "inline_base64": base64.b64encode(data).decode("ascii"),
        }
    )
    return st.one_of(by_url, inline)


def document_dicts(*, modules: Sequence[Module] | None = None) -> st.SearchStrategy[JsonObject]:
    """One document, of one of ``modules`` (any module by default)."""
    return st.fixed_dictionaries(
        {
            "id": document_ids(),
            "module": st.sampled_from(list(modules) if modules else list(Module)).map(str),
            "category": labels(),
            "title": labels(),
            "document_date": calendar_dates(),
            "audience": st.sampled_from(list(Audience)).map(str),
            "content": content_dicts(),
        }
    )


def document_created_dicts(
    *, agency_id: str | None = None, building_id: str | None = None
) -> st.SearchStrategy[JsonObject]:
    """A document-created event, for the given building or any."""
    return st.fixed_dictionaries(
        {
            "schema_version": st.just(1),
            "event_type": st.just("document-created"),
            "event_id": st.uuids().map(str),
            "occurred_at": timestamps(),
            "agency_id": _given_or(agency_id, identifiers()),
            "building_id": _given_or(building_id, identifiers()),
            "document": document_dicts(),
        }
    )


@st.composite
def manifest_snapshot_dicts(
    draw: st.DrawFn,
    *,
    agency_id: str | None = None,
    building_id: str | None = None,
    max_items: int = 12,
) -> list[JsonObject]:
    """Every part of one manifest snapshot, in order (part 1 first)."""
    modules = draw(st.lists(st.sampled_from(list(Module)), min_size=1, unique=True))
    items = draw(
        st.lists(
            document_dicts(modules=modules),
            max_size=max_items,
            unique_by=lambda item: str(item["id"]),
        )
    )
    parts = draw(st.integers(min_value=1, max_value=4))
    cuts = sorted(
        draw(st.lists(st.integers(0, len(items)), min_size=parts - 1, max_size=parts - 1))
    )
    bounds = [0, *cuts, len(items)]
    common = {
        "schema_version": 1,
        "event_type": "manifest-snapshot",
        "snapshot_id": str(draw(st.uuids())),
        "taken_at": draw(timestamps()),
        "agency_id": agency_id if agency_id is not None else draw(identifiers()),
        "building_id": building_id if building_id is not None else draw(identifiers()),
        "modules": [str(module) for module in modules],
        "parts": parts,
        "item_count": len(items),
    }
    return [
        {**common, "part": number, "items": items[bounds[number - 1] : bounds[number]]}
        for number in range(1, parts + 1)
    ]


def manifest_part_dicts(
    *, agency_id: str | None = None, building_id: str | None = None
) -> st.SearchStrategy[JsonObject]:
    """One part, any part, of a manifest snapshot."""
    return manifest_snapshot_dicts(agency_id=agency_id, building_id=building_id).flatmap(
        st.sampled_from
    )


def event_dicts() -> st.SearchStrategy[JsonObject]:
    """Either kind of event."""
    return st.one_of(document_created_dicts(), manifest_part_dicts())


def _given_or(value: str | None, strategy: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return strategy if value is None else st.just(value)
