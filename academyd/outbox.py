"""The outbox relay: what the daemon publishes is first written to SQLite in the transaction that makes
it true, then published here (JetStream, `Nats-Msg-Id` = the row's msg id) and marked.

A crash between commit and publish leaves the row unpublished; the relay publishes it after restart,
and the server's duplicate window drops a second copy of one that did get out just before the crash.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog

from academyd.store import Store

log = structlog.get_logger("academyd.outbox")


class OutboxRelay:
    def __init__(
        self,
        store: Store,
        publish: Callable[[str, bytes, str], Any],
        clock: Callable[[], datetime],
    ) -> None:
        self.store = store
        self.publish = publish
        self.clock = clock
        self._kick = asyncio.Event()

    def kick(self) -> None:
        self._kick.set()

    async def flush(self) -> int:
        """Publish everything pending, oldest first; stop at the first failure (order matters)."""
        sent = 0
        while True:
            rows = self.store.outbox_pending(100)
            if not rows:
                return sent
            for row in rows:
                try:
                    await self.publish(row["subject"], row["payload"].encode(), row["msg_id"])
                except Exception as exc:
                    self.store.outbox_mark_attempt(row["id"])
                    log.warning("outbox_publish_failed", subject=row["subject"], msg_id=row["msg_id"], error=str(exc))
                    return sent
                self.store.outbox_mark_published(row["id"], self.clock())
                sent += 1
                log.info("event_published", subject=row["subject"], event_id=row["msg_id"])

    async def run(self, stop: asyncio.Event, idle_s: float = 1.0) -> None:
        backoff = idle_s
        while not stop.is_set():
            try:
                await asyncio.wait_for(self._kick.wait(), timeout=backoff)
            except TimeoutError:
                pass
            self._kick.clear()
            before = len(self.store.outbox_pending(1))
            await self.flush()
            still = len(self.store.outbox_pending(1))
            backoff = min(backoff * 2, 30.0) if (before and still) else idle_s
