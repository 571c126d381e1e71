"""The post-promotion watch: after each promotion, is the champion worse in Venom than the version it
replaced? (#20)

It ticks as an APScheduler job (`schedule`, every `watch.interval_s`); ingest only pokes it (`poke()`,
after a batch that stored `task.completed` or `feedback.given`), which brings the next tick forward to
`arena.watch_debounce_s` from now (a burst of batches gives one check). It never runs on the ack path.

Each check reads the champion's tasks since its promotion and its parent's record (the version a rollback
restores, `academyd.champion.moves.rollback_target`; the base model, named `base`, for the first
promotion) as the store attributes them (academyd.attribution), and assesses them
(academyd.champion.assess: guardrails, then the anytime-valid test of academyd.anytime, off the event
loop). A promotion ends `confirmed` or `rolled_back` (recorded once in `watch_decisions`), or stays
`watching (n tasks)`. A rollback goes through the champion's compare-and-swap move on the champion it
measured (`expected_from`) with a basis unique to that tenure: two checks of one drop make one rollback.
What it did (rolled back, or was refused and why) is recorded in `champion_watch`; for
`arena.watch_cooldown_min` after that it does nothing, so a refused rollback is not retried on every
batch. After `confirmed` only the guardrails still act.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from academyd.attribution import BASE
from academyd.champion.assess import Assessment, assess
from academyd.champion.moves import rollback_target
from academyd.champion.service import Champion
from academyd.registry import Registry
from academyd.settings import Settings
from academyd.store import Store, iso, parse_iso

log = structlog.get_logger("academyd.champion.monitor")

JOB_ID = "champion-watch"


def promotion_records(store: Store, settings: Settings, champ: dict[str, Any]
                      ) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """(parent name, the champion's outcomes since its promotion, the parent's latest record)."""
    w = settings.watch
    parent_row = rollback_target(Registry(store, settings), champ)
    parent = parent_row["version"] if parent_row else BASE
    start = store.done_seq_at(champ.get("promoted_at") or "")
    mine = store.served_outcomes(champ["version"], thumbs=w.thumbs_override, after_done_seq=start)
    theirs = store.served_outcomes(parent, thumbs=w.thumbs_override, latest=w.parent_tasks)
    return parent, mine, theirs


def assess_champion(store: Store, settings: Settings, champ: dict[str, Any]) -> Assessment:
    """The assessment of `champ`'s current promotion, computed here (for the CLI and tests)."""
    parent, mine, theirs = promotion_records(store, settings, champ)
    return assess(champ["version"], parent, mine, theirs, settings.watch)


class Monitor:
    def __init__(self, store: Store, settings: Settings, clock: Callable[[], datetime], champion: Champion,
                 *, interval_s: float | None = None) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.champion = champion
        self.interval_s = interval_s if interval_s is not None else settings.watch.interval_s
        self.checks = 0
        self.latest: Assessment | None = None  # the last check's assessment of the champion (page, status)
        self._scheduler: Any = None
        self._poked = False
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------ ticking

    def schedule(self, scheduler: Any) -> None:
        """Add the watch to the daemon's APScheduler (an AsyncIOScheduler on the daemon's loop)."""
        self._scheduler = scheduler
        scheduler.add_job(self._tick, "interval", seconds=self.interval_s, id=JOB_ID, coalesce=True,
                          max_instances=1, misfire_grace_time=None,
                          next_run_time=datetime.now(UTC) + timedelta(seconds=1))

    def poke(self) -> None:
        """Ask for a check soon (cheap; never waits): the next tick comes `watch_debounce_s` from now."""
        self._poked = True
        if self._scheduler is None:
            return
        try:
            self._scheduler.modify_job(JOB_ID, next_run_time=datetime.now(UTC) + timedelta(
                seconds=self.settings.arena.watch_debounce_s))
        except Exception:  # the scheduler is shutting down
            pass

    async def _tick(self) -> None:
        self._poked = False
        try:
            await self.check()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("watch_failed")
            raise  # to the scheduler: the daemon reports the job unhealthy until a check succeeds (#22)
        finally:
            if self._poked:  # poked while it checked (max_instances=1 skipped that tick): look again soon
                self.poke()

    # ------------------------------------------------------------ deciding

    def cooldown_until(self) -> datetime | None:
        last = self.store.last_watch()
        if last is None:
            return None
        until = parse_iso(last["at"])
        assert until is not None
        return until + timedelta(minutes=self.settings.arena.watch_cooldown_min)

    def last_action(self) -> dict[str, Any] | None:
        return self.store.last_watch()

    async def check(self) -> str:
        """One decision (and at most one rollback). Returns what happened, in words."""
        async with self._lock:
            return await self._check()

    async def _check(self) -> str:
        self.checks += 1
        now = self.clock()
        until = self.cooldown_until()
        if until is not None and now < until:
            return f"cooling down until {iso(until)}"
        champ = Registry(self.store, self.settings).champion()
        if champ is None:
            return "no champion"
        version, promoted_at = champ["version"], champ.get("promoted_at") or ""
        decided = self.store.decision(version, promoted_at)
        parent, mine, theirs = promotion_records(self.store, self.settings, champ)
        a = await asyncio.to_thread(assess, version, parent, mine, theirs, self.settings.watch)
        self.latest = a
        with self.store.transaction():
            self.store.record_latest(version, promoted_at, parent, decided["state"] if decided else a.state,
                                     a.reason, a.stats, now)
        if decided is not None and not (decided["state"] == "confirmed" and a.state == "rolled_back"
                                        and a.cause != "worse"):
            return f"{decided['state']}: {decided['reason']}"
        if a.state == "watching":
            return a.reason
        if a.state == "confirmed":
            with self.store.transaction():
                self.store.record_decision(version, promoted_at, parent, "confirmed", a.cause, a.at_task, a.reason,
                                           a.stats, now)
            log.info("champion_confirmed", version=version, parent=parent, at_task=a.at_task, reason=a.reason)
            return f"confirmed: {a.reason}"
        log.warning("champion_regressed", version=version, parent=parent, cause=a.cause, at_task=a.at_task,
                    reason=a.reason)
        result = await self.champion.rollback(
            reason=f"automatic: {a.reason}", expected_from=version, basis=f"watch:{version}:{promoted_at}",
        )
        outcome = "rolled_back" if result.get("ok") else "refused"
        why = a.reason if result.get("ok") else str(result.get("error"))
        with self.store.transaction():
            self.store.record_watch(version, outcome, why, self.clock())
            if outcome == "rolled_back":
                self.store.record_decision(version, promoted_at, parent, "rolled_back", a.cause, a.at_task, a.reason,
                                           a.stats, self.clock(), replace=True)
        if outcome == "refused":
            log.warning("watch_rollback_refused", version=version, reason=why)
        return f"{outcome}: {why}"
