"""The bus's callbacks for inbound events: store a fetched batch (acks only after its commit), probe a
degraded store, and write the dead letter of an event the server stopped delivering.

What a stored batch sets off goes through seams: the trigger (`RunRequests`) when lessons arrived, the
champion monitor's `poke` when tasks completed (the watch runs in its own task, never on the ack path),
and the live listeners ("ingest").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from academyd.clock import Clock
from academyd.health import Health
from academyd.ingest import Inbound, Ingestor, decode, event_id_hint, safe_excerpt
from academyd.seams import Counters, Listener, RunRequests
from academyd.settings import Settings
from academyd.store import Store, StoreFault
from handlers import Outcome, Reject

log = structlog.get_logger("academyd.app")


class Intake:
    def __init__(self, settings: Settings, store: Store, ingestor: Ingestor, clock: Clock, health: Health,
                 counters: Counters, runs: RunRequests, poke_monitor: Callable[[], None], emit: Listener) -> None:
        self.settings = settings
        self.store = store
        self.ingestor = ingestor
        self.clock = clock
        self.health = health
        self.counters = counters
        self.runs = runs
        self.poke_monitor = poke_monitor
        self.emit = emit

    async def on_batch(self, batch: list[Inbound]) -> list[Outcome]:
        try:
            result = await self.ingestor.process_async(batch, self.clock())
        except StoreFault as fault:
            self.health.degrade("store", fault.reason, self.clock())
            raise
        if not self.health.ok:
            self.health.recover("store")
        c = self.counters
        c.batches += 1
        c.duplicates += result.duplicates
        try:  # committed: what follows must not cost the batch its acks (the tick re-runs the policy)
            if result.stored.get("lesson.created"):
                self.runs.evaluate("ingest")
            if result.stored.get("task.completed") or result.stored.get("feedback.given"):
                self.poke_monitor()  # the watch is a scheduler job: never on the ack path
        except Exception as exc:
            log.warning("after_ingest_failed", error=f"{type(exc).__name__}: {exc}")
        self.emit("ingest", {"stored": result.stored, "duplicates": result.duplicates, "rejected": result.rejected})
        return result.outcomes

    async def probe_store(self) -> None:
        """While degraded: a real write on a worker thread; raises StoreFault until the store heals."""
        try:
            await asyncio.to_thread(self.ingestor.probe)
        except StoreFault as fault:
            self.health.degrade("store", fault.reason, self.clock())
            raise
        self.health.recover("store")

    async def on_exhausted(self, item: Inbound) -> Reject | None:
        """The server stopped delivering `item` (MAX_DELIVERIES): why, for its dead letter; None if stored."""
        event = decode(item, self.settings.nats.max_payload_bytes)
        if isinstance(event, Reject):
            reason = event
        else:
            if self.store.claimed(event.event_id):
                return None  # stored; only its ack was lost
            reason = Reject("max_deliveries", f"delivered {item.num_delivered} times without being stored")
        try:
            with self.store.transaction():
                self.store.record_dlq(item.subject, reason.reason, reason.detail, event_id=event_id_hint(item),
                                      stream_seq=item.stream_seq, excerpt=safe_excerpt(item.data), now=self.clock())
        except Exception as exc:  # the store is faulted: the stream copy still goes out
            log.warning("dlq_record_failed", stream_seq=item.stream_seq, error=repr(exc))
        return reason
