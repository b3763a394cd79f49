"""A partition's repairs: an audit's missing and changed documents, read again from the input.

A repair command that needs documents' content runs in a task of its own: it reads the partition's
input again (``consumer/kafka/resend.py``, given as ``FindResend``) up to where the processor's
reading stands, then plans the repair (``consumer/core/audit.py``) against the view as it is then.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from consumer.core.audit import Resend, to_resend
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

    def _carry_out(
        self, command: OperatorCommand, plan: Plan, work_source: SourceRecord, source: SourceRecord
    ) -> None:
        raise NotImplementedError

    def _admin_source(self, what: str) -> SourceRecord:
        raise NotImplementedError

    def _start_repair(self, command: OperatorCommand, source: SourceRecord) -> bool:
        """Start the repair in a task if it needs the input; False if it does not."""
        if not self._needs_input(command):
            return False
        # Reading the partition again takes a while: the other records and partitions go on
        # meanwhile, the command's offset stays open until its work is done.
        task = asyncio.create_task(self._repair(command, source))
        self._completions.add(task)
        task.add_done_callback(self._completions.discard)
        return True

    def _needs_input(self, command: OperatorCommand) -> bool:
        """A repair with missing or changed documents, which the input may still describe."""
        return (
            command.command is AgencyAction.REPAIR
            and command.building_id is not None
            and self._find_resend is not None
            and bool(to_resend(command.findings))
        )

    async def _repair(self, command: OperatorCommand, source: SourceRecord) -> None:
        try:
            resend = await self._resend_for(command)
        except Exception as error:  # noqa: BLE001 - the relay stops; its restart repairs again
            self._on_failure(error)  # the command's offset stays uncommitted
            return
        plan = plan_agency_command(self.view, self._routing, command, resend)
        self._carry_out(command, plan, self._admin_source(command.command), source)

    async def _resend_for(self, command: OperatorCommand) -> Mapping[str, Resend]:
        """A repair's missing and changed documents, as the input still describes them."""
        wanted = to_resend(command.findings)
        if self._find_resend is None or command.building_id is None:
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
