"""The post-promotion watch as its own task: is the champion doing worse in Venom than its parent?

Ingest only pokes it (`poke()`, after a batch that stored `task.completed`; the scheduler's tick does
too); it never waits for it, so a rollback (a GGUF export, Ollama calls) never sits on the ack path.
After a poke the monitor waits `arena.watch_debounce_s` (a burst of batches gives one check), then
decides with `academyd.watch.check_champion` and, on a drop, rolls back with compare-and-swap on the
champion it measured (`expected_from`) and a basis unique to that champion's tenure: two checks of one
drop make one rollback. What it did (rolled back, or was refused and why) is recorded in
`champion_watch`; for `arena.watch_cooldown_min` after that it does nothing, so a refused rollback is
not retried on every batch and a second drop right after a rollback waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import structlog

from academyd.champion.moves import rollback_target
from academyd.champion.service import Champion
from academyd.registry import Registry
from academyd.settings import Settings
from academyd.store import Store, iso, parse_iso
from academyd.watch import check_champion

log = structlog.get_logger("academyd.champion.monitor")


class Monitor:
    def __init__(self, store: Store, settings: Settings, clock: Callable[[], datetime], champion: Champion, *,
                 interval_s: float = 600.0) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.champion = champion
        self.interval_s = interval_s
        self._poke = asyncio.Event()
        self.checks = 0

    def poke(self) -> None:
        """Ask for a check soon (cheap; never waits)."""
        self._poke.set()

    def cooldown_until(self) -> datetime | None:
        last = self.store.last_watch()
        if last is None:
            return None
        until = parse_iso(last["at"])
        assert until is not None
        return until + timedelta(minutes=self.settings.arena.watch_cooldown_min)

    def last_action(self) -> dict[str, Any] | None:
        return self.store.last_watch()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(self._poke.wait(), timeout=self.interval_s)
            except TimeoutError:
                pass
            if stop.is_set():
                return
            await asyncio.sleep(self.settings.arena.watch_debounce_s)
            self._poke.clear()
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("watch_failed")

    async def check(self) -> str:
        """One decision (and at most one rollback). Returns what happened, in words."""
        self.checks += 1
        now = self.clock()
        until = self.cooldown_until()
        if until is not None and now < until:
            return f"cooling down until {iso(until)}"
        reg = Registry(self.store, self.settings)
        champ = reg.champion()
        if champ is None:
            return "no champion"
        parent = rollback_target(reg, champ)
        if parent is None:
            return f"{champ['version']} has no parent to compare with"
        decision = check_champion(self.store, self.settings, champ, parent)
        if not decision.rollback:
            return decision.reason
        log.warning("champion_regressed", version=champ["version"], reason=decision.reason, **decision.stats)
        result = await self.champion.rollback(
            reason=f"automatic: {decision.reason}", expected_from=champ["version"],
            basis=f"watch:{champ['version']}:{champ.get('promoted_at')}",
        )
        outcome = "rolled_back" if result.get("ok") else "refused"
        why = decision.reason if result.get("ok") else str(result.get("error"))
        with self.store.transaction():
            self.store.record_watch(champ["version"], outcome, why, self.clock())
        if outcome == "refused":
            log.warning("watch_rollback_refused", version=champ["version"], reason=why)
        return f"{outcome}: {why}"
