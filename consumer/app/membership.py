"""The relay as one member of its consumer group: its part of the partner rates, and leaving.

``GroupMember`` is a part of ``Relay`` (which inherits it): at each assignment it sets the
scheduler's share of every agency's rate to the replica's share of the input partitions, and on a
clean stop a static member leaves the group so that its partitions move at once.
"""

from __future__ import annotations

import asyncio
import logging

from consumer.kafka.connection import KafkaConnection
from consumer.kafka.membership import leave_group
from consumer.metrics import RelayMetrics
from consumer.partner.scheduler import Scheduler
from consumer.settings import Settings

log = logging.getLogger("consumer.app.relay")  # the relay's log

LEAVE_GROUP_TIMEOUT_S = 5.0  # best effort: the session timeout ends the membership anyway


class GroupMember:
    """What ``Relay`` does as a member of the consumer group."""

    settings: Settings
    connection: KafkaConnection
    metrics: RelayMetrics
    stopping: asyncio.Event
    failure: BaseException | None
    _scheduler: Scheduler | None

    def _share_rates(self, owned: set[int], *, partitions: int) -> None:
        """Each agency's rate is the partner's for its key, across replicas: this replica sends
        at the part of it its input partitions are of all (at most the rate, whatever the
        number of replicas; an agency whose buildings sit on one replica's partitions gets less)."""
        share = len(owned) / partitions
        if self._scheduler is None or not owned or share == self._scheduler.rate_share:
            return
        self._scheduler.set_rate_share(share)
        self.metrics.rate_share.set(share)
        log.info("partner rates shared", extra={"share": round(share, 4), "partitions": len(owned)})

    async def _leave_group(self) -> None:
        """A static member that stops cleanly leaves, so that its partitions need not wait."""
        kafka = self.settings.kafka
        if kafka.group_instance_id is None or not kafka.leave_group_on_stop:
            return
        if not self.stopping.is_set() or self.failure is not None:
            return  # a failing relay keeps its membership: the same pod comes back
        await leave_group(
            self.connection,
            group_id=kafka.group_id,
            instance_id=kafka.group_instance_id,
            timeout_s=LEAVE_GROUP_TIMEOUT_S,
        )
