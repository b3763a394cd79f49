"""Decoding: CPU per event and per manifest item, and memory per decoded item, beside a baseline.

(a) CPU time of ``decode_record`` per document-created event (10,000 events), and per item of
    manifest parts of 2,000 items (about 700 kB each, as LSC splits them), beside ``orjson.loads``
    of the same bytes alone: JSON parsed into dicts, nothing validated.
(b) Bytes held per decoded manifest item (tracemalloc), beside the item's own JSON text.
    Target: under 1,300 bytes, what a first publication of 100,000 documents within 150 MB needs.
(c) A manifest part of 100,000 empty items (about 1 MB): CPU time to refuse it and the peak
    memory it takes, beside ``orjson.loads`` of it. Target: peak within 3 times its size.

Run ``python -m bench.bench_decoding``. CPU time, best of a few rounds: the machine may be shared.
"""

from __future__ import annotations

import datetime as dt
import gc
import hashlib
import time
import tracemalloc
import uuid
from collections.abc import Callable
from typing import Any

import orjson

from consumer.core.decoding import Poison, decode_record
from consumer.core.events import DocumentCreated, ManifestSnapshot

AGENCY, BUILDING = "agence-bench", "bat-12"
KEY = f"{AGENCY}:{BUILDING}".encode()
EVENTS = 10_000
ITEMS_PER_PART, PARTS = 2_000, 5
EMPTY_ITEMS = 100_000
ROUNDS = 5
ITEM_TARGET_BYTES = 1_300
PEAK_TARGET_FACTOR = 3.0
LIMIT = 1 << 20


def _document(n: int) -> dict[str, Any]:
    return {
        "id": f"{uuid.UUID(int=n * 2_654_435_761 % 2**128)}:att-{n % 3}",
        "module": "contrats",
        "category": "Contrats",
        "title": f"Contrat d'entretien {n}",
        "document_date": "2025-05-01",
        "audience": "building",
        "content": {
            "media_type": "application/pdf",
            "size_bytes": 40_000 + n,
            "sha256": hashlib.sha256(f"bench/{n}".encode()).hexdigest(),
            "url": f"https://documents.lsc.example/{AGENCY}/{n}.pdf",
        },
    }


def _event(n: int) -> bytes:
    moment = dt.datetime(2025, 6, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=n)
    return orjson.dumps(
        {
            "schema_version": 1,
            "event_type": "document-created",
            "event_id": str(uuid.UUID(int=n + 1)),
            "occurred_at": moment.isoformat().replace("+00:00", "Z"),
            "agency_id": AGENCY,
            "building_id": BUILDING,
            "document": _document(n),
        }
    )


def _manifest_header(item_count: int) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "event_type": "manifest-snapshot",
        "snapshot_id": str(uuid.UUID(int=7)),
        "taken_at": "2025-06-01T02:00:00Z",
        "agency_id": AGENCY,
        "building_id": BUILDING,
        "modules": ["contrats"],
        "parts": PARTS,
        "item_count": item_count,
    }


def _parts() -> list[bytes]:
    header = _manifest_header(ITEMS_PER_PART * PARTS)
    return [
        orjson.dumps(
            {
                **header,
                "part": number + 1,
                "items": [
                    _document(n)
                    for n in range(number * ITEMS_PER_PART, (number + 1) * ITEMS_PER_PART)
                ],
            }
        )
        for number in range(PARTS)
    ]


def _empty_items_part() -> bytes:
    listed = orjson.dumps({**_manifest_header(EMPTY_ITEMS), "parts": 1, "part": 1, "items": []})
    return listed.removesuffix(b"[]}") + b"[" + b",".join([b"{}       "] * EMPTY_ITEMS) + b"]}"


def _decode(topic_kind: str, value: bytes) -> object:
    return decode_record(
        topic_kind=topic_kind, key=KEY, value=value, headers=(), max_value_bytes=LIMIT
    )


def _cpu_seconds(action: Callable[[], object]) -> float:
    """The least CPU time of ``ROUNDS`` runs of ``action``."""
    best = float("inf")
    for _ in range(ROUNDS):
        gc.collect()
        start = time.process_time()
        action()
        best = min(best, time.process_time() - start)
    return best


def _every(decode: Callable[[bytes], object], values: list[bytes]) -> Callable[[], None]:
    def run() -> None:
        for value in values:
            decode(value)

    return run


def bench_cpu() -> None:
    events = [_event(n) for n in range(EVENTS)]
    parts = _parts()
    if not isinstance(_decode("document-created", events[0]), DocumentCreated):
        raise TypeError("the benchmark's own event does not decode")
    if not isinstance(_decode("manifest-snapshot", parts[0]), ManifestSnapshot):
        raise TypeError("the benchmark's own manifest part does not decode")
    items = ITEMS_PER_PART * PARTS

    def per_event(action: Callable[[], object]) -> float:
        return _cpu_seconds(action) / EVENTS * 1e6

    def per_item(action: Callable[[], object]) -> float:
        return _cpu_seconds(action) / items * 1e6

    event_relay = per_event(_every(lambda value: _decode("document-created", value), events))
    event_bare = per_event(_every(orjson.loads, events))
    item_relay = per_item(_every(lambda value: _decode("manifest-snapshot", value), parts))
    item_bare = per_item(_every(orjson.loads, parts))
    print(f"(a) CPU time, best of {ROUNDS} rounds")
    print(
        f"    relay: decode_record          {event_relay:6.2f} us/event  "
        f"{item_relay:6.2f} us/manifest item"
    )
    print(
        f"    baseline: orjson.loads alone  {event_bare:6.2f} us/event  "
        f"{item_bare:6.2f} us/manifest item"
    )
    print(
        f"    ratio relay/baseline          {event_relay / event_bare:6.2f} per event  "
        f"{item_relay / item_bare:6.2f} per item"
    )


def bench_item_bytes() -> None:
    (part, *_) = _parts()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    decoded = _decode("manifest-snapshot", part)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    if not isinstance(decoded, ManifestSnapshot):
        raise TypeError("the benchmark's own manifest part does not decode")
    per_item = held / ITEMS_PER_PART
    text = len(part) / ITEMS_PER_PART
    verdict = "met" if per_item < ITEM_TARGET_BYTES else "MISSED"
    print(f"(b) a decoded manifest part of {ITEMS_PER_PART:,} items, held in memory (tracemalloc)")
    print(f"    relay: decoded item           {per_item:6.0f} bytes/item")
    print(f"    baseline: its JSON text       {text:6.0f} bytes/item")
    print(f"    target < {ITEM_TARGET_BYTES:,} bytes: {verdict}")


def bench_empty_items() -> None:
    value = _empty_items_part()
    refused = _decode("manifest-snapshot", value)
    if not isinstance(refused, Poison):
        raise TypeError("a manifest of empty items decoded")
    relay_s = _cpu_seconds(lambda: _decode("manifest-snapshot", value))
    bare_s = _cpu_seconds(lambda: orjson.loads(value))
    tracemalloc.start()
    _decode("manifest-snapshot", value)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    factor = peak / len(value)
    verdict = "met" if factor <= PEAK_TARGET_FACTOR else "MISSED"
    print(f"(c) a manifest part of {EMPTY_ITEMS:,} empty items, {len(value) / 1e6:.2f} MB")
    print(
        f"    relay: refused ({refused.reason})  {relay_s * 1e3:8.2f} ms CPU, "
        f"peak {peak / 1e6:.2f} MB ({factor:.2f}x its size): {refused.detail}"
    )
    print(f"    baseline: orjson.loads alone  {bare_s * 1e3:8.2f} ms CPU")
    print(f"    target peak <= {PEAK_TARGET_FACTOR:.0f}x its size: {verdict}")


def main() -> None:
    bench_cpu()
    bench_item_bytes()
    bench_empty_items()


if __name__ == "__main__":
    main()
