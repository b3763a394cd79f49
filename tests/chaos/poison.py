"""Records LSC gets wrong, each with the dead-letter reason the relay must give it.

Every maker returns the records of one mistake about one building. What a bad record carries is
never part of LSC's truth: a document it names is a new id, a manifest it belongs to lists less
than the truth. So a relay that acted on one would leave a trace the final check sees (a document
too many on the partner, or one withdrawn and sent again). Manifest parts that are not poison
themselves (the sibling of a refused part, an orphan) carry no reason: they must end without
effect and without a dead letter.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Final

import orjson

from tests.chaos.lsc import (
    DOCUMENTS,
    MANIFESTS,
    MODULES,
    Json,
    Lsc,
    Place,
    Publish,
    document_record,
    headers_of,
    key_of,
    manifest_record,
)

# URLs no HTTP client can fetch (the contract refuses them): each is dead-lettered as bad_url.
UNFETCHABLE_URLS: Final = (
    "https://documents.lsc.example:70000/1.pdf",
    "https://documents..lsc.example/1.pdf",
    "https://documents.lsc.example/1%2G.pdf",
    "https://relay:secret@documents.lsc.example/1.pdf",
    "https://documents.lsc.example/pv 2024.pdf",
)
FUTURE: Final = dt.timedelta(days=1)  # far beyond the clock skew the relay allows


def _bad_document(lsc: Lsc, place: Place) -> Json:
    return lsc.new_document(place, audience="building")


def _event(lsc: Lsc, place: Place, **changes: object) -> Json:
    return {
        **lsc.document_created(place, _bad_document(lsc, place), occurred_at=lsc.clock),
        **changes,
    }


def _raw(
    place: Place, value: bytes | None, *, what: str, reason: str, topic: str = DOCUMENTS
) -> Publish:
    return Publish(topic, key_of(place), value, headers_of("document-created"), what, reason)


def _short_listing(lsc: Lsc, place: Place) -> list[Json]:
    """The building's truth less one or two documents, plus a new one: never LSC's answer."""
    listed = lsc.listing(place, MODULES)
    kept = listed[: max(0, len(listed) - lsc.rng.randint(1, 2))]
    return [*kept, _bad_document(lsc, place)]


def bad_url_document(lsc: Lsc, place: Place) -> list[Publish]:
    url = lsc.rng.choice(UNFETCHABLE_URLS)
    event = lsc.document_created(place, _bad_document(lsc, place), occurred_at=lsc.clock)
    event["document"]["content"] = {**event["document"]["content"], "url": url}
    event["document"]["content"].pop("inline_base64", None)
    return [document_record(place, event, what=f"document with URL {url}", reason="bad_url")]


def bad_url_manifest(lsc: Lsc, place: Place) -> list[Publish]:
    """A two-part snapshot whose second part lists an unfetchable URL: refused whole."""
    items = _short_listing(lsc, place)
    items[-1] = {**items[-1], "content": {**items[-1]["content"], "url": UNFETCHABLE_URLS[0]}}
    items[-1]["content"].pop("inline_base64", None)
    first, second = lsc.snapshot(place, items, modules=MODULES, taken_at=lsc.clock, parts=2)
    return [
        manifest_record(first, what="sibling of a part with a bad URL"),
        manifest_record(second, what="part with a bad URL", reason="bad_url"),
    ]


def future_document(lsc: Lsc, place: Place) -> list[Publish]:
    event = lsc.document_created(place, _bad_document(lsc, place), occurred_at=lsc.now + FUTURE)
    return [
        document_record(
            place, event, what="document from the future", reason="occurred_at_in_future"
        )
    ]


def future_manifest(lsc: Lsc, place: Place) -> list[Publish]:
    taken_at = lsc.now + FUTURE
    parts = lsc.snapshot(
        place, _short_listing(lsc, place), modules=MODULES, taken_at=taken_at, parts=2
    )
    return [
        manifest_record(part, what="manifest from the future", reason="taken_at_in_future")
        for part in parts
    ]


def orphan_part(lsc: Lsc, place: Place) -> list[Publish]:
    """The first part of a snapshot whose second never comes, published three hours ago."""
    long_ago = lsc.now - dt.timedelta(hours=3)
    items = [*_short_listing(lsc, place), _bad_document(lsc, place)]
    first, _ = lsc.snapshot(place, items, modules=MODULES, taken_at=long_ago, parts=2)
    stamp = int(long_ago.timestamp() * 1000)
    return [manifest_record(first, what="orphan part", timestamp_ms=stamp)]


def inconsistent_parts(lsc: Lsc, place: Place) -> list[Publish]:
    """Part 1 of a snapshot, then part 1 again listing something else. Taken at a new instant:
    at the instant of the building's last complete manifest it would be superseded on arrival
    (dropped without effect, both parts), and nothing would be left to contradict."""
    first, _ = lsc.snapshot(
        place, _short_listing(lsc, place), modules=MODULES, taken_at=lsc.tick(), parts=2
    )
    other = {**first, "items": [_bad_document(lsc, place)]}
    return [
        manifest_record(first, what="part later contradicted"),
        manifest_record(other, what="contradicting part", reason="inconsistent_parts"),
    ]


def not_json(lsc: Lsc, place: Place) -> list[Publish]:
    value = b'{"schema_version": 1, "event_type": "document-created", '
    return [_raw(place, value, what="cut JSON", reason="not_json")]


def not_utf8(lsc: Lsc, place: Place) -> list[Publish]:
    return [_raw(place, b'{"title": "\xff\xfe"}', what="not UTF-8", reason="not_utf8")]


def null_value(lsc: Lsc, place: Place) -> list[Publish]:
    topic = lsc.rng.choice((DOCUMENTS, MANIFESTS))
    return [_raw(place, None, what=f"tombstone on {topic}", reason="null_value", topic=topic)]


def key_mismatch(lsc: Lsc, place: Place) -> list[Publish]:
    wrong = (place[0], f"{place[1]}-other")
    value = orjson.dumps(_event(lsc, place))
    return [_raw(wrong, value, what="key of another building", reason="key_mismatch")]


def schema_violation(lsc: Lsc, place: Place) -> list[Publish]:
    event = _event(lsc, place)
    del event["document"]["title"]
    return [_raw(place, orjson.dumps(event), what="no title", reason="schema_violation")]


def unknown_schema_version(lsc: Lsc, place: Place) -> list[Publish]:
    value = orjson.dumps(_event(lsc, place, schema_version=2))
    return [_raw(place, value, what="schema version 2", reason="unknown_schema_version")]


def wrong_topic(lsc: Lsc, place: Place) -> list[Publish]:
    value = orjson.dumps(_event(lsc, place))
    record = _raw(place, value, what="document on the manifest topic", reason="wrong_topic")
    return [Publish(MANIFESTS, record.key, value, record.headers, record.what, record.reason)]


def header_mismatch(lsc: Lsc, place: Place) -> list[Publish]:
    value = orjson.dumps(_event(lsc, place))
    headers = headers_of("manifest-snapshot")
    return [
        Publish(DOCUMENTS, key_of(place), value, headers, "header says manifest", "header_mismatch")
    ]


def item_count_mismatch(lsc: Lsc, place: Place) -> list[Publish]:
    (part,) = lsc.snapshot(
        place, _short_listing(lsc, place), modules=MODULES, taken_at=lsc.clock, parts=1
    )
    part["item_count"] += 1
    return [manifest_record(part, what="item count off by one", reason="item_count_mismatch")]


def duplicate_item_id(lsc: Lsc, place: Place) -> list[Publish]:
    items = _short_listing(lsc, place)
    items.append(items[-1])
    (part,) = lsc.snapshot(place, items, modules=MODULES, taken_at=lsc.clock, parts=1)
    return [manifest_record(part, what="an item listed twice", reason="duplicate_item_id")]


Maker = Callable[[Lsc, Place], list[Publish]]
MAKERS: Final[tuple[Maker, ...]] = (
    bad_url_document,
    bad_url_manifest,
    future_document,
    future_manifest,
    orphan_part,
    inconsistent_parts,
    not_json,
    not_utf8,
    null_value,
    key_mismatch,
    schema_violation,
    unknown_schema_version,
    wrong_topic,
    header_mismatch,
    item_count_mismatch,
    duplicate_item_id,
)
