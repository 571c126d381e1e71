"""Promotion and rollback for the running daemon.

Every move is a compare-and-swap (`academyd.champion.moves.promote` / `rollback` with `expected_champion` /
`expected_from`): a command is decided against the champion it finds when it arrives, the pipeline's
promotion against the champion its verdict was measured against, the monitor's rollback against the
champion whose tasks dropped. The slow preparation (file checks, GGUF export, Ollama) runs concurrently
and off the loop; only the short commit is ordered, by SQLite. A move whose champion changed meanwhile
is refused with the reason: two decisions made on one champion make at most one move.

Preparation is serialised per version (one GGUF export of a version at a time; a second move of the
same version reuses the artifacts the first built).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog

from academyd.champion import moves
from academyd.champion.errors import PromotionRefused, StaleChampion
from academyd.champion.moves import ANY
from academyd.registry import Registry
from academyd.settings import Settings
from academyd.store import Store

log = structlog.get_logger("academyd.champion")


class Champion:
    def __init__(self, store: Store, settings: Settings, clock: Callable[[], datetime],
                 on_commit: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.on_commit = on_commit  # wakes the outbox relay
        self._prepare_locks: dict[str, asyncio.Lock] = {}

    def current(self) -> str | None:
        return self.store.champion_version()

    def _lock(self, version: str | None) -> asyncio.Lock:
        return self._prepare_locks.setdefault(version or "", asyncio.Lock())

    async def promote(self, version: str, *, reason: str = "manual", expected: Any = ANY,
                      basis: str | None = None) -> dict[str, Any]:
        """Make `version` the champion if the champion is still `expected` (ANY: the one there now, as
        found when the request arrives). Returns {"ok": True, **model.promoted} or {"ok": False, "error",
        "stale"}."""
        if expected is ANY:
            expected = self.current()
        try:
            async with self._lock(version):
                payload = await moves.promote(self.store, self.settings, version, reason=reason, now=self.clock(),
                                              expected_champion=expected, basis=basis)
        except PromotionRefused as exc:
            log.warning("promotion_refused", version=version, reason=str(exc), expected=expected)
            return {"ok": False, "error": str(exc), "stale": isinstance(exc, StaleChampion)}
        self.on_commit()
        log.info("model_promoted", version=version, previous=expected, reason=reason)
        return {"ok": True, **payload}

    async def rollback(self, *, reason: str = "manual", expected_from: Any = ANY,
                       basis: str | None = None) -> dict[str, Any]:
        """Roll the champion back if it is still `expected_from` (ANY: the one there now)."""
        if expected_from is ANY:
            expected_from = self.current()
        reg = Registry(self.store, self.settings)
        champ = reg.get(expected_from) if expected_from else None
        target = moves.rollback_target(reg, champ) if champ else None
        try:
            async with self._lock(target["version"] if target else None):
                payload = await moves.rollback(self.store, self.settings, reason=reason, now=self.clock(),
                                               expected_from=expected_from, basis=basis)
        except PromotionRefused as exc:
            log.warning("rollback_refused", reason=str(exc), expected_from=expected_from)
            return {"ok": False, "error": str(exc), "stale": isinstance(exc, StaleChampion)}
        self.on_commit()
        log.info("model_rolled_back", reason=reason, from_version=payload.get("from_version"),
                 to_version=payload.get("to_version"))
        return {"ok": True, **payload}
