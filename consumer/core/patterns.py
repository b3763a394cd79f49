"""The patterns of the LSC event contract: identifiers, URLs, dates, as the JSON Schemas write them.

``schemas/`` holds the same strings (a test compares them), and the event structs check them with
Python's ``re``; the URL's is also written in a second form, ``URL_MATCHER``, and base64 is checked
without a regular expression (``is_base64``), both for speed.
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

# URL_PATTERN for Python's backtracking engine, with the same meaning: a label is a letter or digit,
# at most 62 more letters, digits or hyphens taken at once, not ending in a hyphen and without
# hyphens in 3rd and 4th place; runs of characters are taken at once (possessive quantifiers), so
# no input makes it try again. Checking a typical URL takes a third of the time; tests hold the
# two forms equal.
_FAST_LABEL: Final = f"(?!{_LDH}{{2}}--){_ALNUM}{_LDH}{{0,62}}+(?<!-)"
_FAST_HOST_NAME: Final = f"(?:{_FAST_LABEL}\\.)*+(?=[A-Za-z]){_FAST_LABEL}"
_PATH_CHARS: Final = "[A-Za-z0-9._~!$&'()*+,;=:@-]"
_QUERY_CHARS: Final = "[A-Za-z0-9._~!$&'()*+,;=:@/?-]"
_ESCAPE: Final = "%[0-9A-Fa-f]{2}"
URL_MATCHER: Final = (
    f"^https?://(?:{_FAST_HOST_NAME}|{_IPV4})(?::{_PORT})?"
    f"(?:/(?:{_PATH_CHARS}++|{_ESCAPE})*+)*+"
    f"(?:\\?(?:{_QUERY_CHARS}++|{_ESCAPE})*+)?(?:#(?:{_QUERY_CHARS}++|{_ESCAPE})*+)?\\Z"
)


_BASE64_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def is_base64(text: str) -> bool:
    """Whether ``text`` matches ``BASE64_PATTERN``, checked in C loops rather than by ``re``.

    The pattern's groups of four cost Python's engine about 5 us on a small PDF's inline content,
    most of a document-created event's decoding. Same meaning: a length that is a multiple of 4,
    letters, digits, '+' and '/', then at most two '=' at the end (tests hold the two equal).
    What is left once the alphabet is deleted must be nothing, or that padding.
    """
    if len(text) % 4 or not text.isascii():
        return False
    rest = text.encode().translate(None, _BASE64_ALPHABET)
    return not rest or (rest in (b"=", b"==") and text.endswith(rest.decode()))
