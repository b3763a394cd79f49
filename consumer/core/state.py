"""State records: the values of the changelog topic that holds the relay's published view.

A document record is keyed ``"{agency}:{building}:{document_id}"``, a building record
``"{agency}:{building}"``; a tombstone (``None`` value) withdraws either. The bytes of a value are
``state_codec``'s (JSON v1, and the compact v2 form of ``state_compact`` for document records).
Restoring a partition and live processing apply the very same records, so the two paths cannot
drift.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from consumer.core.events import Document, Module
from consumer.errors import RelayError

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)


class StateDecodeError(RelayError):
    """A changelog record this relay cannot read: corrupt, or written by a newer schema."""

    fatal = True


def to_epoch_us(value: dt.datetime) -> int:
    """Microseconds since the epoch; a naive datetime is taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return (value - EPOCH) // _MICROSECOND


def from_epoch_us(value: int) -> dt.datetime:
    """The UTC datetime ``value`` microseconds after the epoch."""
    return EPOCH + dt.timedelta(microseconds=value)


@dataclass(frozen=True, slots=True)
class BuildingKey:
    """One building of one agency. Agency and building ids never contain ``:``."""

    agency_id: str
    building_id: str

    def encode(self) -> bytes:
        return f"{self.agency_id}:{self.building_id}".encode()


@dataclass(frozen=True, slots=True)
class DocKey:
    """One document of one building. Document ids may contain ``:``; the two ids before never do."""

    agency_id: str
    building_id: str
    document_id: str

    def encode(self) -> bytes:
        return f"{self.agency_id}:{self.building_id}:{self.document_id}".encode()

    @property
    def building(self) -> BuildingKey:
        return BuildingKey(self.agency_id, self.building_id)


@dataclass(frozen=True, slots=True)
class AgencyKey:
    """The operator's controls of one agency (paused, approved plan), one record per partition.

    Encoded ``"{agency}:~agency"``: a building id never starts with ``~``, so it cannot collide.
    """

    agency_id: str

    def encode(self) -> bytes:
        return f"{self.agency_id}:{AGENCY_MARKER}".encode()


AGENCY_MARKER = "~agency"


def decode_key(raw: bytes) -> DocKey | BuildingKey | AgencyKey:
    """Read a changelog key: three parts name a document, two a building (or agency controls)."""
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise StateDecodeError(f"state key {raw!r} is not UTF-8") from exc
    parts = text.split(":", 2)
    if any(not part for part in parts) or len(parts) == 1:
        raise StateDecodeError(f"state key {text!r} is not agency:building[:document]")
    if len(parts) == 2:
        if parts[1] == AGENCY_MARKER:
            return AgencyKey(parts[0])
        return BuildingKey(parts[0], parts[1])
    return DocKey(parts[0], parts[1], parts[2])


class DocStatus(StrEnum):
    PUBLISHED = "published"  # on the partner: remote id and sha256 known
    BASELINE = "baseline"  # listed at cut-over (fresh, or before the since date): never sent
    UPLOADING = "uploading"  # upload intent written before the partner call
    DELETE_HELD = "delete_held"  # on the partner; the mass-deletion guard holds its withdrawal
    PARKED = "parked"  # needs an operator (unmapped building, bad credentials)
    # LSC's newest word is not to send it (routing does not forward its newest version, e.g. its
    # audience became owners, or a manifest left it out and it was withdrawn): not on the
    # partner, kept until a newer manifest leaves it out, so that an older manifest or event,
    # read late or read again after a crash, cannot bring it back
    FILTERED = "filtered"
    # A held manifest would keep it unpublished (created before its taken_at, not listed): not
    # sent until an operator decides. The record keeps the document, which a discard sends; a
    # ``remote_id`` names an earlier version on the partner, which a release withdraws.
    UPLOAD_HELD = "upload_held"


ON_PARTNER = frozenset({DocStatus.PUBLISHED, DocStatus.DELETE_HELD})
"""Statuses of documents the relay published and the partner holds."""

HELD = frozenset({DocStatus.DELETE_HELD, DocStatus.UPLOAD_HELD})
"""Statuses of documents that wait for an operator's decision on a held manifest."""


class HoldDecision(StrEnum):
    RELEASE = "release"  # the manifest is applied as if it had not been held
    DISCARD = "discard"  # the manifest is dropped as if it had never come


@dataclass(frozen=True, slots=True)
class HeldManifest:
    """The complete manifest of a building that the mass-deletion guard holds: the question.

    While ``decision`` is None, the documents it would decide (withdraw, or keep unpublished)
    wait with ``held_by`` set to ``snapshot_id``; documents it lists flow. Once decided, it is
    kept until a newer manifest, so that the manifest read again after a crash is decided, not
    asked again.
    """

    snapshot_id: str
    taken_at: dt.datetime
    modules: frozenset[Module]
    decision: HoldDecision | None = None

    def decides(self, module: Module, occurred_at: dt.datetime) -> bool:
        """Whether an undecided hold decides a version of ``module`` seen at ``occurred_at``."""
        return (
            self.decision is None
            and module in self.modules
            and to_epoch_us(occurred_at) <= to_epoch_us(self.taken_at)
        )


@dataclass(frozen=True, slots=True)
class LateCopyChecks:
    """The lookups still owed to a document that was sent again after an in-doubt create.

    A create that got no answer may be carried out by the partner later than the relay waited
    (``PARTNER__IN_DOUBT_SETTLE_S``); a lookup found nothing then, and the document was sent
    again at ``since``. The relay looks it up by reference again at each offset of its schedule
    (``PARTNER__LATE_COPY_CHECKS_S``, seconds after ``since``) and withdraws any second copy;
    ``left`` is how many of those lookups have not been made yet.
    """

    since: dt.datetime
    left: int

    def due_at(self, schedule: Sequence[float]) -> dt.datetime | None:
        """When the next lookup is due under ``schedule``; None when none is left.

        The lookups left are the last ``left`` of the schedule: a schedule shortened since the
        record was written owes at most all of its own, one lengthened the ones at its end.
        """
        if self.left < 1 or not schedule:
            return None
        index = max(0, len(schedule) - self.left)
        return self.since + dt.timedelta(seconds=schedule[index])

    def after_one(self) -> LateCopyChecks | None:
        """What is owed once the next lookup was made; None when it was the last."""
        return LateCopyChecks(self.since, self.left - 1) if self.left > 1 else None


@dataclass(frozen=True, slots=True)
class DocumentRecord:
    """What the relay knows about one document.

    ``seen_at`` is the ``occurred_at`` of the document-created event or the ``taken_at`` of the
    manifest that listed it. ``document`` is kept for parked and ``upload_held`` records only, so
    that they can be sent once an operator fixes the configuration or discards the held
    manifest; everything else is redone from the input, which is read again from the last
    committed offset. ``late_copy_checks``: the lookups still owed after the document was sent
    again following an in-doubt create (rare, and only for minutes: such records keep the JSON
    form).
    """

    key: DocKey
    status: DocStatus
    sha256: str
    module: Module
    seen_at: dt.datetime
    document_date: dt.date
    size_bytes: int
    remote_id: str | None = None
    condominium_id: str | None = None
    held_by: str | None = None
    parked_reason: str | None = None
    document: Document | None = None
    late_copy_checks: LateCopyChecks | None = None


@dataclass(frozen=True, slots=True)
class BuildingRecord:
    """Per building: the ``taken_at`` of the newest complete manifest applied, per module, and
    the manifest the guard holds (or held, with the operator's decision)."""

    agency_id: str
    building_id: str
    manifest_taken_at: Mapping[Module, dt.datetime] = field(default_factory=dict)
    first_publication_done: bool = False
    held: HeldManifest | None = None

    @property
    def key(self) -> BuildingKey:
        return BuildingKey(self.agency_id, self.building_id)


@dataclass(frozen=True, slots=True)
class AgencyRecord:
    """Operator controls of one agency, written to every partition that learns them.

    ``paused``: nothing of the agency is sent (its work waits, offsets stay uncommitted).
    ``backfill_paused``: its first publication (the backfill lane) waits; live documents go on.
    ``approved_plan``: the fingerprint of the first-publication plan an operator approved, for
    ``approved_modules`` (a module enabled later is a new first publication, approved anew).
    """

    agency_id: str
    paused: bool = False
    backfill_paused: bool = False
    changed_by: str = ""
    changed_at: dt.datetime | None = None
    approved_plan: str | None = None
    approved_modules: frozenset[Module] = frozenset()

    @property
    def key(self) -> AgencyKey:
        return AgencyKey(self.agency_id)


@dataclass(frozen=True, slots=True)
class Tombstone:
    """Withdraws a document (or a building record) from the view; compaction then forgets it."""

    key: DocKey | BuildingKey | AgencyKey


StateRecord = DocumentRecord | BuildingRecord | AgencyRecord | Tombstone
