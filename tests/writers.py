"""What a fake changelog writer needs beyond ``write``: the relay's writer also takes records
queued (``submit``) and says when it has room; a fake that writes at once does both by writing."""

from __future__ import annotations

import asyncio

from consumer.core.state import StateRecord


class WritesAtOnce:
    """Mix into a fake writer that defines ``write``: ``submit`` writes in a task of its own and
    there is always room."""

    async def write(self, record: StateRecord) -> None:
        raise NotImplementedError  # the fake's own

    def submit(self, record: StateRecord) -> asyncio.Future[None]:
        return asyncio.ensure_future(self.write(record))

    async def room(self) -> None:
        return None
