"""The patterns of the LSC event contract: identifiers, URLs, dates, as the JSON Schemas write them.

``schemas/`` holds the same strings (a test compares them); ``for_rust`` gives each the form
pydantic's Rust regex engine reads with the same meaning, which the event models use.
"""

from __future__ import annotations

from typing import Final

# The patterns are those of the schemas, character for character. They end with `$(?![\s\S])`
# ("nothing follows") because a bare `$` also matches before a final newline in Python's `re`,
# which both jsonschema and the models below use.
IDENTIFIER_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$(?![\s\S])"
UUID_PATTERN: Final = (
    r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$(?![\s\S])"
)
DOCUMENT_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$(?![\s\S])"
SHA256_PATTERN: Final = r"^[0-9a-f]{64}$(?![\s\S])"
# A URL the HTTP stack can always fetch: http(s), a host name (RFC 1123 labels of at most 63
# letters, digits and hyphens, the last one starting with a letter, none with hyphens in 3rd and
# 4th place, which RFC 5891 reserves for "xn--" labels that may not decode) or a dotted IPv4
# address, a port from 1 to 65535, then RFC 3986 characters with %HH escapes only. No user info,
# no IP literal in brackets, no white space or control character.
_ALNUM: Final = "[A-Za-z0-9]"
_LDH: Final = "[A-Za-z0-9-]"
_LABEL_TAIL: Final = (
    f"(?:{_LDH}{{0,2}}{_ALNUM}|{_LDH}(?:{_ALNUM}{_LDH}|-{_ALNUM}){_LDH}{{0,58}}{_ALNUM})?"
)
_HOST_NAME: Final = f"(?:{_ALNUM}{_LABEL_TAIL}\\.)*[A-Za-z]{_LABEL_TAIL}"
_OCTET: Final = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4: Final = f"{_OCTET}(?:\\.{_OCTET}){{3}}"
_PORT: Final = (
    "(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
)
_PCHAR: Final = "(?:[A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})"
URL_PATTERN: Final = (
    f"^https?://(?:{_HOST_NAME}|{_IPV4})(?::{_PORT})?"
    f"(?:/{_PCHAR}*)*(?:\\?(?:{_PCHAR}|[/?])*)?(?:#(?:{_PCHAR}|[/?])*)?$(?![\\s\\S])"
)
BASE64_PATTERN: Final = (
    r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$(?![\s\S])"
)
DATE_PATTERN: Final = r"^[12][0-9]{3}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$(?![\s\S])"
TIMESTAMP_PATTERN: Final = (
    r"^[12][0-9]{3}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?"
    r"(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$(?![\s\S])"
)

_END_OF_TEXT: Final = r"$(?![\s\S])"


def for_rust(pattern: str) -> str:
    r"""The same pattern for pydantic's (faster) Rust engine, meaning what Python's ``re`` means.

    Rust has no look-ahead but ``\z`` ends the text; and Python's ``\s`` also counts the
    separators U+001C..U+001F as white space, which Rust's does not.
    """
    return (
        pattern.replace(_END_OF_TEXT, r"\z")
        .replace(r"[^\s]", r"[^\s\x1c-\x1f]")
        .replace(r"\S", r"[^\s\x1c-\x1f]")
    )
