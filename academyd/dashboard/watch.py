"""The production watch as the page and `academyd models show` see it (#20): per promotion, the champion's
running success rate with its confidence sequence, the parent's rate and the lines it is measured against,
the decision and when it came. Decided promotions come from `watch_decisions` (what was true when the watch
decided); the current champion's, while watching, is assessed now (numpy: call it off the event loop)."""

from __future__ import annotations

from typing import Any

from academyd.champion.monitor import assess_champion
from academyd.registry import Registry
from academyd.settings import Settings
from academyd.store import Store


def _view(champion: str, parent: str, state: str, cause: str, at_task: int, reason: str, stats: dict[str, Any],
          decided_at: str | None, promoted_at: str | None, current: bool) -> dict[str, Any]:
    keep = ("tasks", "successes", "rate", "cs_lower", "cs_upper", "parent_tasks", "parent_successes", "parent_rate",
            "parent_lower", "parent_upper", "rollback_below", "confirm_above", "alpha", "rollback_margin",
            "confirm_margin", "thumbs", "series")
    return {"version": champion, "parent": parent, "state": state, "cause": cause, "at_task": at_task,
            "reason": reason, "decided_at": decided_at, "promoted_at": promoted_at, "current": current,
            **{k: stats.get(k) for k in keep}}


def promotions(store: Store, settings: Settings, limit: int = 10) -> list[dict[str, Any]]:
    """Newest first: the current champion's promotion (decided or watching), then earlier decisions."""
    out: list[dict[str, Any]] = []
    champ = Registry(store, settings).champion() if store.has_table("watch_decisions") else None
    seen: set[tuple[str, str]] = set()
    if champ is not None:
        promoted_at = champ.get("promoted_at") or ""
        decided = store.decision(champ["version"], promoted_at)
        if decided is None:
            a = assess_champion(store, settings, champ)
            out.append(_view(champ["version"], a.stats.get("parent") or "", "watching", "", 0,
                             a.reason, a.stats, None, promoted_at, True))
            seen.add((champ["version"], promoted_at))
    if store.has_table("watch_decisions"):
        for d in store.decisions(limit):
            if (d["champion"], d["promoted_at"]) in seen:
                continue
            current = champ is not None and d["champion"] == champ["version"] and d["promoted_at"] == (
                champ.get("promoted_at") or "")
            out.append(_view(d["champion"], d["parent"], d["state"], d["cause"], d["at_task"], d["reason"],
                             d["stats"], d["decided_at"], d["promoted_at"], current))
    return out[:limit]


def of_version(store: Store, settings: Settings, version: str) -> list[dict[str, Any]]:
    """Every watched promotion of `version` (for `academyd models show V`)."""
    return [p for p in promotions(store, settings, limit=1000) if p["version"] == version]


def read(db_path: Any, settings: Settings, limit: int = 10) -> list[dict[str, Any]]:
    """`promotions` on a read-only connection of its own (for a worker thread beside the daemon's loop)."""
    store = Store.open_readonly(db_path)
    try:
        return promotions(store, settings, limit)
    finally:
        store.close()
