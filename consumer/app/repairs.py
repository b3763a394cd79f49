"""A partition's repairs: an audit's findings checked with the partner, then settled.

A repair command runs in a task of its own. It carries what to check, not what to delete: the
task looks each finding's reference up on the partner (``consumer/partner/copies.py``, given as
``FindCopies``), reads the partition's input again for the missing and changed documents the
partner bears out (``consumer/kafka/resend.py``, given as ``FindResend``) up to where the
processor's reading stands, then plans the repair (``consumer/core/audit.py``) against the view
as it is then.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from consumer.core.audit import Copies, Resend, to_resend
from consumer.core.commands import AgencyAction, OperatorCommand
from consumer.core.controls import plan_agency_command
from consumer.core.offsets import OffsetTracker
from consumer.core.planning.plan import Plan
from consumer.core.records import SourceRecord
from consumer.core.routing import RoutingTable
from consumer.core.view import PublishedView

log = logging.getLogger("consumer.app.processor")  # the processor's log, as before the split

FindResend = Callable[
    [Mapping[str, tuple[str, int]], tuple[str, str], frozenset[str]],
    Awaitable[Mapping[str, Resend]],
]
"""Reads the partition's input again up to the given offsets, for a repair's documents."""

FindCopies = Callable[[str, str, frozenset[str]], Awaitable[Copies]]
"""Looks references up on the partner (agency, condominium, references): each one's copies, a
reference that could not be looked up left out."""

_INPUT_KINDS = ("document-created", "manifest-snapshot")


class RepairWork:
    """The repair half of ``PartitionProcessor``."""

    view: PublishedView
    _routing: RoutingTable
    _trackers: dict[str, OffsetTracker]
    _kinds: dict[str, str]
    _completions: set[asyncio.Future[None]]
    _on_failure: Callable[[BaseException], None]
    _find_resend: FindResend | None
    _find_copies: FindCopies | None

    def _carry_out(
        self, command: OperatorCommand, plan: Plan, work_source: SourceRecord, source: SourceRecord
    ) -> None:
        raise NotImplementedError

    def _admin_source(self, what: str) -> SourceRecord:
        raise NotImplementedError

    def _start_repair(self, command: OperatorCommand, source: SourceRecord) -> bool:
        """Start a repair in a task; False if ``command`` is not one."""
        if command.command is not AgencyAction.REPAIR or command.building_id is None:
            return False
        # Asking the partner and reading the partition again take a while: the other records
        # and partitions go on meanwhile, the command's offset stays open until its work is done.
        task = asyncio.create_task(self._repair(command, source))
        self._completions.add(task)
        task.add_done_callback(self._completions.discard)
        return True

    async def _repair(self, command: OperatorCommand, source: SourceRecord) -> None:
        try:
            copies = await self._copies_for(command)
            resend = await self._resend_for(command, copies)
        except Exception as error:  # noqa: BLE001 - the relay stops; its restart repairs again
            self._on_failure(error)  # the command's offset stays uncommitted
            return
        plan = plan_agency_command(self.view, self._routing, command, resend, copies)
        self._carry_out(command, plan, self._admin_source(command.command), source)

    async def _copies_for(self, command: OperatorCommand) -> Copies:
        """The partner's copies of each reference the findings name, in the building's
        condominium; without a way to ask (or a condominium) nothing is confirmed."""
        config = self._routing.agency(command.agency_id)
        building = command.building_id
        condominium = config.condominia.get(building) if config and building else None
        if self._find_copies is None or condominium is None:
            return {}
        references = frozenset(f.document_id for f in command.findings)
        return await self._find_copies(command.agency_id, condominium, references)

    async def _resend_for(self, command: OperatorCommand, copies: Copies) -> Mapping[str, Resend]:
        """A repair's missing and changed documents, as the input still describes them."""
        wanted = to_resend(command.findings, copies)
        if self._find_resend is None or command.building_id is None or not wanted:
            return {}
        until = {
            topic: (kind, self._trackers[topic].next_to_read)
            for topic, kind in self._kinds.items()
            if kind in _INPUT_KINDS
        }
        found = await self._find_resend(until, (command.agency_id, command.building_id), wanted)
        if len(found) < len(wanted):
            log.warning(
                "repair: documents no longer in the input are forgotten until LSC sends them again",
                extra={
                    "agency": command.agency_id,
                    "building": command.building_id,
                    "forgotten": sorted(wanted - found.keys()),
                },
            )
        return found
