"""Leaving the consumer group on a clean stop, also as a static member.

A static member (KIP-345, ``KAFKA__GROUP_INSTANCE_ID``) sends no LeaveGroup when it stops, so that
a restart within the session timeout finds its partitions waiting and causes no rebalance. That
pays off when a container restarts inside the same pod. On a rolling update the new pod has a new
name, and the stopped pod's partitions would wait a whole session timeout before moving. So on a
clean stop, after the last commit, the relay removes its own static membership by instance id:
LeaveGroup version 3, the request behind Kafka's ``removeMembersFromConsumerGroup``, which
aiokafka does not offer. A crash leaves the membership in place, as static membership intends.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, UnknownMemberIdError, for_code
from aiokafka.protocol.api import Request, Response
from aiokafka.protocol.types import Array, Int16, Int32, Schema, String

from consumer.kafka.connection import KafkaConnection
from consumer.kafka.startup import start_client

log = logging.getLogger(__name__)

_UNKNOWN_MEMBER_ID = ""  # members named by instance id only, as Kafka's admin client does


class LeaveGroupResponse_v3(Response):  # type: ignore[misc]  # noqa: N801 (aiokafka naming)
    API_KEY = 13
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        (
            "members",
            Array(
                ("member_id", String("utf-8")),
                ("group_instance_id", String("utf-8")),
                ("error_code", Int16),
            ),
        ),
    )


class LeaveGroupRequest_v3(Request):  # type: ignore[misc]  # noqa: N801
    API_KEY = 13
    API_VERSION = 3
    RESPONSE_TYPE = LeaveGroupResponse_v3
    SCHEMA = Schema(
        ("group_id", String("utf-8")),
        ("members", Array(("member_id", String("utf-8")), ("group_instance_id", String("utf-8")))),
    )


async def leave_group(
    connection: KafkaConnection, *, group_id: str, instance_id: str, timeout_s: float
) -> bool:
    """Remove static member ``instance_id`` from ``group_id``; True when the group let it go.

    Best effort: the stop it belongs to must finish whatever Kafka answers, so every failure is
    one warning line and the membership then ends with the session timeout, as it would have.
    """
    admin = AIOKafkaAdminClient(**connection.options())
    try:
        async with asyncio.timeout(timeout_s):
            await start_client(admin, connection)
            coordinator = await admin.find_coordinator(group_id)
            request = LeaveGroupRequest_v3(group_id, [(_UNKNOWN_MEMBER_ID, instance_id)])
            # aiokafka's admin client has no public call for a request it does not model.
            response = await admin._send_request_to_node(coordinator, request)
    except (KafkaError, OSError, TimeoutError) as exc:
        log.warning(
            "could not leave the consumer group; its partitions move after the session timeout",
            extra={"group": group_id, "instance": instance_id, "error": repr(exc)},
        )
        return False
    finally:
        await admin.close()
    codes = [response.error_code, *(member[2] for member in response.members)]
    # An unknown member has already gone (its session ended, or an earlier stop removed it).
    errors = [for_code(c).__name__ for c in codes if c and c != UnknownMemberIdError.errno]
    if errors:
        log.warning(
            "the consumer group refused to let this replica go; its partitions move after the "
            "session timeout",
            extra={"group": group_id, "instance": instance_id, "error": ", ".join(errors)},
        )
        return False
    log.info("left the consumer group", extra={"group": group_id, "instance": instance_id})
    return True
