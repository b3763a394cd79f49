"""The audit: what ChouetteCopro holds with the relay's references, against the relay's view.

Per condominium, the partner's documents that carry a reference (the relay's; hand-made ones have
none and are never looked at again) are compared with the view's documents of every building
mapped to that condominium: **missing** (the view says published, the partner does not hold it),
**unexpected** (the partner holds it, the view does not know that document id) and **changed**
(different sha256). A repair is an operator command per building: it carries what to check, not
what to delete. The replica that owns the building looks each finding's reference up on the partner
again and checks the answer against its current view: an unexpected copy is deleted only when it
carries the relay's reference and the view does not hold it, and a missing or changed document the
partner bears out is uploaded again through the scheduler, from its newest record in the replica's
input partition; one beyond the input's retention is forgotten (a changed one takes the partner's
sha256), so that LSC's next manifest sends it again like any delta. The list requests are paced:
never more than ``AUDIT__RATE_SHARE`` of the agency's rate, and on a replica each also takes one of
the agency's own tokens, so uploads and the audit together stay within the agency's rate.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from consumer.core.audit import compare
from consumer.core.commands import AgencyAction, Finding, FindingKind
from consumer.core.planning.plan import Lane
from consumer.core.state import ON_PARTNER, DocumentRecord
from consumer.errors import ConfigError, PartnerRetriableError
from consumer.partner.answers import RemoteDocument
from consumer.partner.client import ChouetteCoproClient, list_page
from consumer.partner.keys import ApiKeyStore
from consumer.partner.ratelimit import RateLimit, TokenBucket

if TYPE_CHECKING:
    from consumer.ops.admin import Operator
    from consumer.partner.scheduler import Scheduler


async def run_audit(
    operator: Operator,
    agency_id: str,
    *,
    building_id: str | None = None,
    repair: bool = False,
    requested_by: str,
    scheduler: Scheduler | None = None,
) -> dict[str, Any]:
    """Audit one agency (or one building) across the cluster; with ``repair``, queue the fixes.

    ``scheduler`` holds the agency's limiter on the replica running the audit; the CLI has none,
    and its audit is paced by its share alone.
    """
    settings = operator.settings
    config = operator.routing_table().agency(agency_id)
    if config is None:
        raise ValueError(f"agency {agency_id} is not in the routing file")
    rate = config.rate_per_second or settings.partner.default_rate_per_second
    pace = AuditPace(
        agency_id, RateLimit(rate).share(settings.audit.rate_share), scheduler=scheduler
    )
    if not settings.partner.base_url:
        raise ConfigError("set CHOUETTE_RELAY_PARTNER__BASE_URL: the audit asks ChouetteCopro")
    buildings_of: dict[str, list[str]] = {}
    for building, condominium in sorted(config.condominia.items()):
        if building_id in (None, building):
            buildings_of.setdefault(condominium, []).append(building)
    if not buildings_of:
        raise ValueError(f"building {building_id} of {agency_id} is not mapped to a condominium")
    records: dict[str, list[DocumentRecord]] = {}
    for view in await operator.views():
        for building in {b for bs in buildings_of.values() for b in bs}:
            records.setdefault(building, []).extend(view.documents(agency_id, building))
    report: list[dict[str, Any]] = []
    to_repair: dict[str, list[Finding]] = {}
    keys = ApiKeyStore(settings.partner.api_keys_dir)
    async with ChouetteCoproClient(
        base_url=settings.partner.base_url,
        api_keys=keys,
        timeout_s=settings.partner.timeout_s,
        max_answer_bytes=settings.partner.max_answer_bytes,
    ) as partner:
        for condominium, buildings in sorted(buildings_of.items()):
            remote = await _list_documents(
                partner, agency_id=agency_id, condominium_id=condominium, pace=pace
            )
            known = [r for b in buildings for r in records.get(b, [])]
            findings = compare(known, remote)
            for building, finding in findings:
                to_repair.setdefault(building, []).append(finding)
            report.append(
                {
                    "condominium": condominium,
                    "buildings": buildings,
                    "relay_documents": sum(1 for r in known if r.status in ON_PARTNER),
                    "partner_documents": sum(1 for d in remote if d.reference is not None),
                    "hand_made": sum(1 for d in remote if d.reference is None),
                    **{
                        kind.value: [
                            {"building": b, **f.model_dump(exclude={"kind"}, exclude_none=True)}
                            for b, f in findings
                            if f.kind is kind
                        ]
                        for kind in FindingKind
                    },
                }
            )
    totals = {kind.value: sum(len(c[kind.value]) for c in report) for kind in FindingKind}
    result: dict[str, Any] = {
        "agency": agency_id,
        "findings": totals,
        "condominia": report,
        "requests": {
            "sent": pace.taken,
            "per_second_at_most": pace.limit.rate_per_second,
            "share_of_agency_rate": settings.audit.rate_share,
            "agency_limiter": scheduler is not None,
        },
    }
    if repair:
        queued = []
        for building, fixes in sorted(to_repair.items()):
            for start in range(0, len(fixes), _PER_COMMAND):
                queued.append(
                    await operator.queue(
                        AgencyAction.REPAIR,
                        agency_id,
                        building,
                        requested_by=requested_by,
                        findings=tuple(fixes[start : start + _PER_COMMAND]),
                    )
                )
        result["repairs"] = queued
        result["repair_note"] = _REPAIR_NOTE
    return result


def render_audit(report: dict[str, Any], *, shown: int = 10) -> str:
    """An audit's report for a person: the totals, then only the condominia with findings.

    The JSON lists every condominium, clean ones included (``--json``); a person wants what
    differs, at most ``shown`` documents per condominium and kind.
    """
    totals: dict[str, int] = report["findings"]
    condominia: list[dict[str, Any]] = report["condominia"]
    ours = sum(c["relay_documents"] for c in condominia)
    by_hand = sum(c["hand_made"] for c in condominia)
    lines = [
        f"{report['agency']}: {len(condominia)} condominia audited, {ours} documents published "
        f"by the relay ({by_hand} made by hand on ChouetteCopro, never touched)"
    ]
    if not any(totals.values()):
        lines.append("  no difference between ChouetteCopro and the relay's view")
    else:
        counts = ", ".join(f"{count} {kind}" for kind, count in totals.items())
        lines.append(f"  differences: {counts}")
    for condominium in condominia:
        for kind in FindingKind:
            found = condominium[kind.value]
            if not found:
                continue
            names = ", ".join(f"{f['document_id']} ({f['building']})" for f in found[:shown])
            more = f" and {len(found) - shown} more" if len(found) > shown else ""
            lines.append(
                f"  condominium {condominium['condominium']}: {len(found)} {kind.value}: "
                f"{names}{more}"
            )
    requests = report["requests"]
    paced = "through the replica's limiter" if requests["agency_limiter"] else "from here"
    lines.append(
        f"  requests: {requests['sent']} sent, at most {requests['per_second_at_most']:g}/s "
        f"({requests['share_of_agency_rate']:.0%} of the agency's rate), {paced}"
    )
    if "repairs" in report:
        lines.append(
            f"  repairs queued: {len(report['repairs'])} commands; {report['repair_note']}"
        )
        for queued in report["repairs"]:
            lines += [f"  {queued['building']}: {said}" for said in queued.get("said", ())]
    elif any(totals.values()):
        lines.append("  to repair: the same command with --repair")
    return "\n".join(lines)


_REPAIR_NOTE = (
    "the owning replicas look each finding up on ChouetteCopro again and act only on what it "
    "bears out: unexpected copies with the relay's reference that their view does not hold are "
    "deleted; missing and changed documents are uploaded again from the "
    "relay's input topics, at the agency's rate; those no longer in the input (beyond retention) "
    "are forgotten until LSC's next manifest of their building, and the owning replica logs "
    "their ids ('repair: documents no longer in the input are forgotten ...')"
)
_PER_COMMAND = 500  # findings per repair command: well under the topic's message size


_PAGE_ATTEMPTS = 5  # a page the partner fails (429, 5xx, a timeout) this often ends the audit
_PAGE_WAIT_S = 30.0  # a partner that asks for a longer wait (an outage) ends it at once


async def _list_documents(
    partner: ChouetteCoproClient,
    *,
    agency_id: str,
    condominium_id: str,
    pace: AuditPace,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> list[RemoteDocument]:
    """Every document of a condominium, page by page, each request paced.

    A page the partner fails for a while is asked again after its Retry-After (or 1, 2, 4, 8 s):
    one 429 or 503 in an audit of thousands of documents does not end it. A partner asking for
    more than ``_PAGE_WAIT_S``, or failing the page ``_PAGE_ATTEMPTS`` times, ends the audit.
    """
    found: list[RemoteDocument] = []
    number = 1
    while True:
        for attempt in range(1, _PAGE_ATTEMPTS + 1):
            await pace()
            try:
                page, more = await list_page(
                    partner, agency_id=agency_id, condominium_id=condominium_id, number=number
                )
                break
            except PartnerRetriableError as exc:
                wait = exc.retry_after if exc.retry_after is not None else 2.0 ** (attempt - 1)
                if attempt == _PAGE_ATTEMPTS or wait > _PAGE_WAIT_S:
                    raise
                await sleep(wait)
        found += page
        if not more:
            return found
        number += 1


class AuditPace:
    """Awaited before each of the audit's requests to the partner.

    It takes a token of the audit's own bucket (its share of the agency's rate, burst one) and
    then, on a replica, one of the agency's tokens from the relay's scheduler: the audit never
    exceeds its share, and what it takes is not sent by the agency's uploads meanwhile.
    """

    def __init__(
        self,
        agency_id: str,
        limit: RateLimit,
        *,
        scheduler: Scheduler | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.agency_id = agency_id
        self.limit = limit
        self.taken = 0
        self._bucket = TokenBucket(limit, now=clock())
        self._scheduler = scheduler
        self._clock = clock
        self._sleep = sleep

    async def __call__(self) -> None:
        while True:
            now = self._clock()
            if self._bucket.try_take(now):
                break
            await self._sleep(max(self._bucket.available_at(now) - now, 0.001))
        if self._scheduler is not None:
            # A live-lane job that sends nothing: the agency token it takes when it starts is
            # this request's. Waiting beside the scheduler for a token instead would lose every
            # race to a running backfill, and the audit would wait for the backfill's end. Not
            # gated: an audit sends nothing, so a paused agency can be audited.
            await self._scheduler.submit(
                _request_follows, agency_id=self.agency_id, lane=Lane.LIVE, gated=False
            )
        self.taken += 1


async def _request_follows() -> None:
    """The job of an audit's token: the request itself is sent by the audit right after."""
