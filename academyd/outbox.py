"""The outbox relay: what the daemon publishes is first written to SQLite in the transaction that makes
it true, then published here (JetStream, `Nats-Msg-Id` = the row's msg id) and marked.

A crash between commit and publish leaves the row unpublished; the relay publishes it after restart,
and the server's duplicate window drops a second copy of one that did get out just before the crash.

A row that fails while the bus is connected (too large for the server, a subject no stream captures,
a payload the server refuses) gets its attempt counted and its error kept, and the relay goes on with
the rows after it: one bad event must not hold back `model.promoted`. After `outbox.max_attempts`
failures it is parked: left unpublished, shown in `academy.status` and on the page with its error,
until an operator unparks it (`Store.outbox_unpark`). While the bus is disconnected nothing is tried
and nothing is counted: an outage parks nothing. Order is kept among rows that publish; a failing row
is retried after rows queued behind it (consumers are idempotent by event id and events carry `at`).

Published rows are deleted after `outbox.retention_h` (the stream keeps the events themselves).

Progress events (`academy.training.progress`) go through the outbox too, throttled to
`training.progress_per_s` (2/s). Measured by bench/bench_outbox.py (2-core Xeon, real nats-server with
`sync_interval: always`): one progress event through the outbox costs ~6 ms wall (two fsyncs: SQLite
and JetStream) and ~1 ms of daemon CPU, against ~0.45 ms wall and ~0.16 ms CPU for a core NATS
publish: 0.2% of a core at 2/s. For that the progress is in the durable event stream like every other
event: the page and `train --follow` can replay a run after a reconnect, a follower that was down
catches up, and a remote worker's progress and the daemon's look the same to a consumer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import structlog

from academyd.secrets import scanner
from academyd.store import Store

log = structlog.get_logger("academyd.outbox")

PRUNE_EVERY_S = 600.0


class OutboxRelay:
    def __init__(
        self,
        store: Store,
        publish: Callable[[str, bytes, str], Any],
        clock: Callable[[], datetime],
        *,
        connected: Callable[[], bool] = lambda: True,
        max_attempts: int = 10,
        retention: timedelta = timedelta(days=7),
    ) -> None:
        self.store = store
        self.publish = publish
        self.clock = clock
        self.connected = connected
        self.max_attempts = max_attempts
        self.retention = retention
        self._kick = asyncio.Event()
        self._last_prune = 0.0

    def kick(self) -> None:
        self._kick.set()

    async def flush(self) -> int:
        """Publish everything pending, oldest first; a failing row is counted (parked at the limit) and
        skipped for this pass. Stops when the bus is disconnected. Returns how many were published."""
        sent, after = 0, 0
        while self.connected():
            rows = self.store.outbox_pending(100, after_id=after)
            if not rows:
                return sent
            for row in rows:
                after = row["id"]
                if not self.connected():
                    return sent
                try:
                    await self.publish(row["subject"], public_payload(row["payload"]).encode(), row["msg_id"])
                except Exception as exc:
                    if not self.connected():  # the connection went: not this row's fault, try it again later
                        log.warning("outbox_publish_interrupted", subject=row["subject"], msg_id=row["msg_id"],
                                    error=str(exc))
                        return sent
                    error = f"{type(exc).__name__}: {exc}"
                    parked = self.store.outbox_mark_failed(row["id"], error, self.clock(),
                                                           max_attempts=self.max_attempts)
                    log.log(40 if parked else 30, "outbox_parked" if parked else "outbox_publish_failed",
                            subject=row["subject"], msg_id=row["msg_id"], attempts=row["attempts"] + 1,
                            error=error)
                    continue
                self.store.outbox_mark_published(row["id"], self.clock())
                sent += 1
                log.info("event_published", subject=row["subject"], event_id=row["msg_id"])
        return sent

    def prune(self) -> int:
        """Delete rows published more than `retention` ago."""
        n = self.store.outbox_prune(self.clock() - self.retention)
        if n:
            log.info("outbox_pruned", rows=n)
        return n

    async def run(self, stop: asyncio.Event, idle_s: float = 1.0) -> None:
        loop = asyncio.get_running_loop()
        backoff = idle_s
        while not stop.is_set():
            try:
                await asyncio.wait_for(self._kick.wait(), timeout=backoff)
            except TimeoutError:
                pass
            self._kick.clear()
            await self.flush()
            still = self.store.outbox_counts()["pending"]
            backoff = min(backoff * 2, 30.0) if still else idle_s
            if loop.time() - self._last_prune >= PRUNE_EVERY_S:
                self._last_prune = loop.time()
                self.prune()


def public_payload(payload: str) -> str:
    """What goes on the bus: the payload with any secret redacted (an error message quoting a trainer's
    output, a reason typed on the page); byte-identical when there is none."""
    import json

    try:
        body = json.loads(payload)
    except ValueError:
        return scanner().redact(payload)
    public = scanner().redact_obj(body)
    return payload if public == body else json.dumps(public, ensure_ascii=False)
