"""A small demo publication: what LSC would emit for three agencies, used by ``make run``.

Three agencies with the three first-publication modes, a few buildings (one of them not mapped to
a condominium), a few dozen real PDFs served by the local document store, their manifests, live
documents after the manifests, a per-owner document that must never be forwarded, and one poison
record that goes to the dead-letter topic. ``make run DEMO_DOCUMENTS=N`` adds an agency being
onboarded: N documents of history that wait for an operator's approval.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from consumer.local.docstore import DocumentStore

MODULES = ("ag", "contrats", "carnet_entretien", "diagnostics")
AGENCIES: dict[str, dict[str, Any]] = {
    "agence-lyon": {
        "first_publication": "history",
        "buildings": {"bat-1": "c-lyon-1", "bat-2": "c-lyon-2"},
        "audiences": ["building", "council"],
    },
    "agence-nantes": {
        "first_publication": "since:2025-01-01",
        "buildings": {"bat-7": "c-nantes-7"},
        "audiences": ["building"],
        "unmapped": ["bat-99"],
    },
    "agence-paris": {
        "first_publication": "fresh",
        "buildings": {"bat-3": "c-paris-3"},
        "audiences": ["building", "owners"],
    },
}


ONBOARDING = "agence-grenoble"
_PER_BUILDING = 1000  # documents of each building of the onboarded agency
_PER_PART = 500  # manifest items per record: well under the input topics' message size
ONBOARDING_RATE = 100.0  # requests a second: 20,000 documents in a few minutes


def demo_agencies(onboarding: int = 0) -> dict[str, dict[str, Any]]:
    """The demo agencies and, with ``onboarding`` documents, the agency being onboarded."""
    agencies = dict(AGENCIES)
    if onboarding > 0:
        count = math.ceil(onboarding / _PER_BUILDING)
        agencies[ONBOARDING] = {
            "first_publication": "history",
            "approval": "operator",
            "rate_per_second": ONBOARDING_RATE,
            "documents": onboarding,
            "buildings": {f"bat-{n:02d}": f"c-grenoble-{n:02d}" for n in range(1, count + 1)},
            "audiences": ["building"],
        }
    return agencies


@dataclass(slots=True)
class DemoRecord:
    topic_kind: str  # "documents" or "manifests"
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)


def routing_toml(agencies: dict[str, dict[str, Any]] = AGENCIES) -> str:
    # The demo shows forwarding at once; production agencies (and the onboarded one) wait for an
    # operator's approval.
    lines = ["[defaults]", "rate_per_second = 20.0", "burst = 20", 'approval = "auto"', ""]
    for agency, spec in agencies.items():
        modules = ", ".join(f'"{m}"' for m in MODULES)
        audiences = ", ".join(f'"{a}"' for a in spec["audiences"])
        lines += [
            f"[agencies.{agency}]",
            f"modules = [{modules}]",
            f"audiences = [{audiences}]",
            f'first_publication = "{spec["first_publication"]}"',
            *([f'approval = "{spec["approval"]}"'] if "approval" in spec else []),
            *(
                [f"rate_per_second = {spec['rate_per_second']}"]
                if "rate_per_second" in spec
                else []
            ),
            "",
            f"[agencies.{agency}.condominia]",
        ]
        lines += [f'"{b}" = "{c}"' for b, c in spec["buildings"].items()]
        lines.append("")
    return "\n".join(lines)


def demo_publication(store: DocumentStore, *, now: dt.datetime) -> list[DemoRecord]:
    """The records to publish, in order: history, manifests, then live documents."""
    records: list[DemoRecord] = []
    counter = 0

    def document(
        agency: str, building: str, index: int, *, date: dt.date, audience: str
    ) -> dict[str, Any]:
        nonlocal counter
        counter += 1
        module = MODULES[index % len(MODULES)]
        title = f"{module.upper()} {building} n{index} ({date.isoformat()})"
        stored = store.add_pdf(f"{agency}-{building}-{index}", title)
        return {
            "id": f"{uuid.uuid5(uuid.NAMESPACE_URL, f'{agency}/{building}/{index}')}:pdf",
            "module": module,
            "category": "Documents",
            "title": title,
            "document_date": date.isoformat(),
            "audience": audience,
            "content": {
                "media_type": "application/pdf",
                "size_bytes": stored.size,
                "sha256": stored.sha256,
                "url": stored.url,
            },
        }

    taken_at = now - dt.timedelta(minutes=5)
    for agency, spec in AGENCIES.items():
        buildings = list(spec["buildings"]) + list(spec.get("unmapped", []))
        for building in buildings:
            history = [
                document(
                    agency,
                    building,
                    i,
                    date=dt.date(2023 + i % 3, 1 + i % 12, 10),
                    audience="building",
                )
                for i in range(6)
            ]
            history.append(
                document(agency, building, 6, date=dt.date(2025, 3, 1), audience="individual")
            )
            items_per_part = 4
            parts = [
                history[i : i + items_per_part] for i in range(0, len(history), items_per_part)
            ]
            snapshot = str(uuid.uuid4())
            for number, items in enumerate(parts, start=1):
                records.append(
                    _record(
                        "manifests",
                        agency,
                        building,
                        {
                            "schema_version": 1,
                            "event_type": "manifest-snapshot",
                            "snapshot_id": snapshot,
                            "taken_at": _ts(taken_at),
                            "agency_id": agency,
                            "building_id": building,
                            "modules": list(MODULES),
                            "part": number,
                            "parts": len(parts),
                            "item_count": len(history),
                            "items": items,
                        },
                    )
                )
            for i in range(7, 9):
                records.append(
                    _record(
                        "documents",
                        agency,
                        building,
                        {
                            "schema_version": 1,
                            "event_type": "document-created",
                            "event_id": str(uuid.uuid4()),
                            "occurred_at": _ts(now + dt.timedelta(seconds=i)),
                            "agency_id": agency,
                            "building_id": building,
                            "document": document(
                                agency, building, i, date=now.date(), audience="building"
                            ),
                        },
                    )
                )
    records.append(
        DemoRecord(
            "documents",
            b"agence-lyon:bat-1",
            b'{"schema_version": 1, "event_type": ',
            [("event-type", b"document-created")],
        )
    )
    return records


def onboarding_publication(
    store: DocumentStore, spec: dict[str, Any], *, now: dt.datetime
) -> list[DemoRecord]:
    """The manifests of the onboarded agency: its whole history, a building at a time."""
    records: list[DemoRecord] = []
    left = spec["documents"]
    for building in spec["buildings"]:
        items = []
        for index in range(min(left, _PER_BUILDING)):
            module = MODULES[index % len(MODULES)]
            date = dt.date(2015 + index % 10, 1 + index % 12, 1 + index % 28)
            title = f"{module.upper()} {building} n{index} ({date.isoformat()})"
            stored = store.add_pdf(f"{ONBOARDING}-{building}-{index}", title)
            name = f"{ONBOARDING}/{building}/{index}"
            items.append(
                {
                    "id": f"{uuid.uuid5(uuid.NAMESPACE_URL, name)}:pdf",
                    "module": module,
                    "category": "Documents",
                    "title": title,
                    "document_date": date.isoformat(),
                    "audience": "building",
                    "content": {
                        "media_type": "application/pdf",
                        "size_bytes": stored.size,
                        "sha256": stored.sha256,
                        "url": stored.url,
                    },
                }
            )
        left -= len(items)
        parts = [items[i : i + _PER_PART] for i in range(0, len(items), _PER_PART)]
        snapshot = str(uuid.uuid4())
        for number, part in enumerate(parts, start=1):
            body = {
                "schema_version": 1,
                "event_type": "manifest-snapshot",
                "snapshot_id": snapshot,
                "taken_at": _ts(now - dt.timedelta(minutes=5)),
                "agency_id": ONBOARDING,
                "building_id": building,
                "modules": list(MODULES),
                "part": number,
                "parts": len(parts),
                "item_count": len(items),
                "items": part,
            }
            records.append(_record("manifests", ONBOARDING, building, body))
    return records


def _record(kind: str, agency: str, building: str, body: dict[str, Any]) -> DemoRecord:
    return DemoRecord(
        kind,
        f"{agency}:{building}".encode(),
        orjson.dumps(body),
        [("event-type", body["event_type"].encode()), ("schema-version", b"1")],
    )


def _ts(moment: dt.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
