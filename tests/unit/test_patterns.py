"""The models check strings with pydantic's Rust regex engine; the schemas with Python's ``re``.

Both must accept exactly the same strings, including the corners where the engines differ: a
trailing newline, and the separators U+001C..U+001F that Python counts as white space.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from consumer.core import events

CORNERS = ["\n", "\x1c", "\x1f", "\x85", "\xa0", " ", "\t", "\u2028", "a", "0", "-", ":", "/"]
PATTERNS = {
    "identifier": (events.IDENTIFIER_PATTERN, events.Identifier),
    "document_id": (events.DOCUMENT_ID_PATTERN, events.DocumentId),
    "sha256": (events.SHA256_PATTERN, events.Sha256Hex),
    "url": (events.URL_PATTERN, events.Url),
}
SEEDS = {
    "identifier": "agence-lyon",
    "document_id": "0b9f:12",
    "sha256": "a" * 64,
    "url": "https://lsc.example/doc.pdf",
}


def _model_accepts(annotation: Any, value: str) -> bool:
    try:
        TypeAdapter(annotation).validate_python(value)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("name", sorted(PATTERNS))
@given(data=st.data())
def test_model_and_schema_patterns_accept_the_same_strings(name: str, data: st.DataObject) -> None:
    pattern, annotation = PATTERNS[name]
    seed = SEEDS[name]
    position = data.draw(st.integers(min_value=0, max_value=len(seed)))
    insert = data.draw(st.text(alphabet=st.sampled_from(CORNERS), max_size=2))
    value = seed[:position] + insert + seed[position:]
    assert _model_accepts(annotation, value) == (re.search(pattern, value) is not None)


@pytest.mark.parametrize("title", ["\x1c", "\x1f\x1e", " \n", "Titre", "\x85x"])
def test_a_label_needs_a_character_python_does_not_call_white_space(title: str) -> None:
    assert _model_accepts(events.Label, title) == (re.search(r"\S", title) is not None)
