"""The structs check strings as msgspec applies the schemas' patterns, the URL in a form of its own.

Both must accept exactly the same strings as the schemas' patterns, including the corners: a
trailing newline, and the separators U+001C..U+001F that Python counts as white space. Every URL
the pattern accepts is one the HTTP stack parses and can resolve.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from consumer.core import events, patterns
from consumer.core.decoding import decode_record
from consumer.core.poison import Poison

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"

CORNERS = ["\n", "\x1c", "\x1f", "\x85", "\xa0", " ", "\t", "\u2028", "a", "0", "-", ":", "/"]


def _model_accepts(annotation: Any, value: str) -> bool:
    try:
        msgspec.json.decode(msgspec.json.encode(value), type=annotation)
    except msgspec.ValidationError:
        return False
    return True


PATTERNS: dict[str, tuple[str, Callable[[str], bool]]] = {
    "identifier": (patterns.IDENTIFIER_PATTERN, partial(_model_accepts, events.Identifier)),
    "document_id": (patterns.DOCUMENT_ID_PATTERN, partial(_model_accepts, events.DocumentId)),
    "sha256": (patterns.SHA256_PATTERN, partial(_model_accepts, events.Sha256Hex)),
    "url": (patterns.URL_PATTERN, events.fetchable),
    "base64": (patterns.BASE64_PATTERN, patterns.is_base64),
}
SEEDS = {
    "identifier": "agence-lyon",
    "document_id": "0b9f:12",
    "sha256": "a" * 64,
    "url": "https://lsc.example/doc.pdf",
    "base64": "JVBERi0xLjQK+/8=",
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
@given(data=st.data())
def test_model_and_schema_patterns_accept_the_same_strings(name: str, data: st.DataObject) -> None:
    pattern, accepts = PATTERNS[name]
    seed = SEEDS[name]
    position = data.draw(st.integers(min_value=0, max_value=len(seed)))
    insert = data.draw(st.text(alphabet=st.sampled_from(CORNERS), max_size=2))
    value = seed[:position] + insert + seed[position:]
    assert accepts(value) == (re.search(pattern, value) is not None)


@pytest.mark.parametrize("title", ["\x1c", "\x1f\x1e", " \n", "Titre", "\x85x"])
def test_a_label_needs_a_character_python_does_not_call_white_space(title: str) -> None:
    assert _model_accepts(events.Label, title) == (re.search(r"\S", title) is not None)


def test_the_schema_states_the_url_pattern_of_the_models() -> None:
    schema = json.loads((SCHEMAS / "document.v1.schema.json").read_text(encoding="utf-8"))
    assert schema["$defs"]["content"]["properties"]["url"]["pattern"] == patterns.URL_PATTERN


_URL_CORNERS = [*CORNERS, "%", "2", "z", "@", "[", "]", ":", ".", "#", "\x7f", "é", "\\", "?", "_"]


@given(data=st.data())
def test_model_and_schema_agree_on_urls_broken_anywhere(data: st.DataObject) -> None:
    seed = data.draw(
        st.sampled_from(
            [
                "https://documents.lsc.example:8443/a/b.pdf?x=1#p",
                "http://10.0.0.1:8082/documents/1.pdf",
                "https://xn--bcher-kva.lsc.example/1.pdf",
            ]
        )
    )
    position = data.draw(st.integers(min_value=0, max_value=len(seed)))
    insert = data.draw(st.text(alphabet=st.sampled_from(_URL_CORNERS), max_size=4))
    value = seed[:position] + insert + seed[position:]
    assert events.fetchable(value) == (
        re.search(patterns.URL_PATTERN, value) is not None and len(value) <= 2048
    )


_LABELS = st.one_of(
    st.text(alphabet="aZ9-", max_size=6),
    st.integers(min_value=60, max_value=66).map(lambda length: "a" * (length - 1) + "9"),
    st.sampled_from(["xn--a", "ab--c", "a--b", "1", "256", "255", "09"]),
)


@given(st.lists(_LABELS, min_size=1, max_size=5), st.sampled_from(["", ":1", ":65536", "/a%2F"]))
def test_model_and_schema_agree_on_host_names(labels: list[str], tail: str) -> None:
    # The host is where the two forms differ most: labels, hyphens, lengths, dotted numbers.
    value = f"https://{'.'.join(labels)}{tail}"
    assert events.fetchable(value) == (re.search(patterns.URL_PATTERN, value) is not None)


# What hypothesis can generate from: the same pattern with Python's own end of text.
_URL_GENERATOR = patterns.URL_PATTERN.replace(r"$(?![\s\S])", r"\Z")


@settings(max_examples=300)
@given(st.from_regex(_URL_GENERATOR, fullmatch=True).filter(lambda url: len(url) <= 2048))
def test_every_url_the_contract_accepts_is_one_the_http_stack_can_fetch(url: str) -> None:
    assert events.fetchable(url)
    parsed = URL(url)  # what the content fetcher builds; raises for what it cannot parse
    assert parsed.scheme in ("http", "https")
    assert parsed.host
    assert parsed.port is not None
    assert 1 <= parsed.port <= 65535
    assert parsed.user is None
    assert parsed.password is None
    # The resolver encodes the host with IDNA (as asyncio's getaddrinfo does): no label is empty
    # or too long, and nothing in it fails to decode.
    parsed.host.encode("idna")
    assert parsed.raw_host == parsed.host.lower() or parsed.raw_host == parsed.host


_BASE64_CORNERS = ["=", "+", "/", "A", "z", "9", "\n", " ", "é", "-", "_", "\x00"]


@given(st.lists(st.sampled_from(_BASE64_CORNERS), max_size=12).map("".join))
def test_base64_is_checked_as_the_pattern_says(value: str) -> None:
    assert patterns.is_base64(value) == (re.search(patterns.BASE64_PATTERN, value) is not None)


@given(st.binary(max_size=64))
def test_every_encoding_of_bytes_is_base64_and_one_character_less_is_not(raw: bytes) -> None:
    encoded = base64.b64encode(raw).decode()
    assert patterns.is_base64(encoded)
    if encoded:
        assert not patterns.is_base64(encoded[:-1])


def test_a_document_whose_inline_content_is_not_base64_is_refused_naming_the_field() -> None:
    value = {
        "schema_version": 1,
        "event_type": "document-created",
        "event_id": "00000000-0000-0000-0000-000000000001",
        "occurred_at": "2025-06-01T00:00:00Z",
        "agency_id": "agence-a",
        "building_id": "bat-1",
        "document": {
            "id": "doc-1",
            "module": "ag",
            "category": "AG",
            "title": "Convocation",
            "document_date": "2025-05-01",
            "audience": "building",
            "content": {
                "media_type": "application/pdf",
                "size_bytes": 3,
                "sha256": "a" * 64,
                "inline_base64": "JVBE=i0x",
            },
        },
    }
    refused = decode_record(
        topic_kind="document-created",
        key=b"agence-a:bat-1",
        value=json.dumps(value).encode(),
        headers=[("schema_version", b"1"), ("event_type", b"document-created")],
        max_value_bytes=1_048_576,
    )
    assert isinstance(refused, Poison)
    assert refused.detail == (
        "document.content.inline_base64: Expected standard base64 with padding"
    )
