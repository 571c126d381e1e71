"""The trigger: asks the policy whether to train, and records the run it says yes to.

A requested run (and its `academy.training.requested`, queued in the same transaction by the store) is
all it makes; the pipeline, told through `on_request`, does the rest. It is the daemon's `RunRequests`:
ingest, the tick, the `academy.cmd.train` command, the page and a finished run all ask it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from academyd import policy
from academyd.clock import Clock
from academyd.events import EventSink
from academyd.settings import Settings
from academyd.store import ActiveRunExists, Store

log = structlog.get_logger("academyd.app")


class Trigger:
    def __init__(self, settings: Settings, store: Store, clock: Clock, sink: EventSink) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.sink = sink
        self._wakes: list[Callable[[], None]] = []

    def on_request(self, wake: Callable[[], None]) -> None:
        """`wake()` after each recorded run (the pipeline's)."""
        self._wakes.append(wake)

    def evaluate(self, trigger: str, *, force: bool = False, reason: str | None = None) -> dict[str, Any]:
        """Run the policy now; record a run (and its outbox event) when it says yes."""
        now = self.clock()
        snap = self.store.snapshot()
        decision = policy.decide(self.settings.policy, snap, now, force=force)
        if not decision.train:
            log.debug("policy_no", trigger=trigger, reason=decision.reason)
            return {"ok": False, "started": False, "reason": decision.reason, "active_run": snap.active_run}
        why = reason or (f"forced: {trigger}" if force else decision.reason)
        try:
            run_id = self.store.create_run(
                reason=why, forced=force, new_lessons=snap.new_successful_lessons, now=now,
                attempt=snap.consecutive_failures + 1,
            )
        except ActiveRunExists as exc:
            return {"ok": False, "started": False, "reason": f"run {exc} is active", "active_run": str(exc)}
        log.info("training_requested", run_id=run_id, trigger=trigger, reason=why, forced=force)
        self.sink.kick()
        for wake in self._wakes:
            wake()
        return {"ok": True, "started": True, "run_id": run_id, "reason": why}
