"""LSC as the chaos test models it: its truth over time and the records it publishes about it.

``Lsc`` keeps, per building, the documents currently published (the truth), moves a clock forward
with every change, and turns changes into the Kafka records LSC would publish: a document-created
event per new version, and manifest snapshots (the building's truth for some modules) in parts.
Randomness comes from the one seeded ``random.Random`` it is given, so a seed gives one history.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import random
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from consumer.local.pdf import make_pdf

DOCUMENTS: Final = "documents"
MANIFESTS: Final = "manifests"
MODULES: Final = ("ag", "contrats", "carnet_entretien", "diagnostics")

Json = dict[str, Any]
Place = tuple[str, str]  # (agency, building)
Serve = Callable[[str, bytes], str]  # the document store: name and bytes in, URL out


@dataclass(frozen=True, slots=True)
class Publish:
    """One record to publish; ``reason`` is the dead-letter reason it must end with, if any."""

    topic: str  # DOCUMENTS or MANIFESTS
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    what: str
    reason: str | None = None
    timestamp_ms: int | None = None


def timestamp(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def key_of(place: Place) -> bytes:
    return f"{place[0]}:{place[1]}".encode()


def headers_of(event_type: str) -> tuple[tuple[str, bytes], ...]:
    return (("event-type", event_type.encode()), ("schema-version", b"1"))


class Lsc:
    """LSC's truth over time, driven by a seeded random generator."""

    def __init__(
        self, rng: random.Random, *, places: Sequence[Place], serve: Serve, start: dt.datetime
    ) -> None:
        self.rng = rng
        self.serve = serve
        self.clock = start
        self.now = start  # the relay's clock at the time of the stream (events beyond it are bad)
        self.truth: dict[Place, dict[str, Json]] = {place: {} for place in places}
        self.versions: Counter[str] = Counter()
        self._numbers = 0

    def tick(self) -> dt.datetime:
        """The next instant of LSC's history: a few seconds later."""
        self.clock += dt.timedelta(seconds=self.rng.uniform(1.0, 4.0))
        return self.clock

    def uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    # -- documents ---------------------------------------------------------------------------

    def new_document(self, place: Place, *, audience: str | None = None) -> Json:
        """A document of a new id (not in the truth yet), its content inline or in the store."""
        self._numbers += 1
        document_id = f"{place[1]}-{self._numbers:04d}:att-1"
        if audience is None:
            audience = self.rng.choices(["building", "council", "individual"], [8, 2, 1])[0]
        return self.version_of(
            {
                "id": document_id,
                "module": self.rng.choice(MODULES),
                "category": "Documents",
                "document_date": (
                    dt.date(2019, 1, 1) + dt.timedelta(days=self.rng.randrange(2500))
                ).isoformat(),
                "audience": audience,
            }
        )

    def version_of(self, document: Json, **changes: Any) -> Json:
        """The next version of ``document``: new title and content, with ``changes``."""
        document_id = document["id"]
        self.versions[document_id] += 1
        version = self.versions[document_id]
        title = f"{document_id} version {version}"
        data = make_pdf(title, lines=[f"audience {changes.get('audience', document['audience'])}"])
        content: Json = {
            "media_type": "application/pdf",
            "size_bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        if self.rng.random() < 0.5:
            content["inline_base64"] = base64.b64encode(data).decode()
        else:
            name = f"{document_id.replace(':', '_')}-v{version}"
            content["url"] = self.serve(name, data)
        return {**document, "title": title, "content": content, **changes}

    def document_created(self, place: Place, document: Json, *, occurred_at: dt.datetime) -> Json:
        return {
            "schema_version": 1,
            "event_type": "document-created",
            "event_id": self.uuid(),
            "occurred_at": timestamp(occurred_at),
            "agency_id": place[0],
            "building_id": place[1],
            "document": document,
        }

    def publish_document(self, place: Place, document: Json) -> Publish:
        """LSC publishes ``document`` (new, or a new version): the truth changes, an event goes."""
        self.truth[place][document["id"]] = document
        event = self.document_created(place, document, occurred_at=self.tick())
        return document_record(place, event, what=f"document {document['id']}")

    # -- manifests ---------------------------------------------------------------------------

    def listing(self, place: Place, modules: Sequence[str]) -> list[Json]:
        """What a snapshot of ``modules`` taken now lists: the building's truth in them."""
        return [d for d in self.truth[place].values() if d["module"] in modules]

    def snapshot(
        self,
        place: Place,
        items: list[Json],
        *,
        modules: Sequence[str],
        taken_at: dt.datetime,
        parts: int,
        snapshot_id: str | None = None,
    ) -> list[Json]:
        """Every part of one snapshot listing ``items``, in part order."""
        parts = max(1, min(parts, len(items)))
        cuts = sorted(self.rng.sample(range(1, len(items)), parts - 1)) if parts > 1 else []
        bounds = [0, *cuts, len(items)]
        common = {
            "schema_version": 1,
            "event_type": "manifest-snapshot",
            "snapshot_id": snapshot_id or self.uuid(),
            "taken_at": timestamp(taken_at),
            "agency_id": place[0],
            "building_id": place[1],
            "modules": list(modules),
            "parts": parts,
            "item_count": len(items),
        }
        return [
            {**common, "part": number, "items": items[bounds[number - 1] : bounds[number]]}
            for number in range(1, parts + 1)
        ]


def document_record(place: Place, event: Json, *, what: str, reason: str | None = None) -> Publish:
    return Publish(
        DOCUMENTS, key_of(place), orjson.dumps(event), headers_of("document-created"), what, reason
    )


def manifest_record(
    part: Json, *, what: str, reason: str | None = None, timestamp_ms: int | None = None
) -> Publish:
    place = (part["agency_id"], part["building_id"])
    return Publish(
        MANIFESTS,
        key_of(place),
        orjson.dumps(part),
        headers_of("manifest-snapshot"),
        f"{what} (snapshot {part['snapshot_id']} part {part['part']}/{part['parts']})",
        reason,
        timestamp_ms,
    )
