"""`active_adapter.json`: what Venom (and anything else on the host) reads to know which adapter serves.

Written after a promotion or rollback commits (off the event loop, in commit order), and resynchronised
with the registry's champion when the daemon starts (a crash between the commit and the write).
"""

from __future__ import annotations

import asyncio
import json
import weakref
from datetime import datetime
from pathlib import Path
from typing import Any

from academyd.clock import iso
from academyd.files import atomic_write_json
from academyd.ollama import OLLAMA_PREFIX
from academyd.registry import Registry
from academyd.settings import Settings
from academyd.store import Store

METRIC_KEYS = ("heldout_loss", "heldout_perplexity", "exact_match", "chrf", "general_loss", "general_kl")


def summary_metrics(row: dict[str, Any] | None, side: str = "candidate") -> dict[str, Any]:
    """The headline numbers of a version's own evaluation (its `candidate` side), flat."""
    if row is None:
        return {}
    m = row.get("metrics") or {}
    held, gen, forget = m.get("heldout") or {}, m.get("generation") or {}, m.get("forgetting") or {}
    out = {
        "heldout_loss": held.get(f"{side}_loss"),
        "heldout_perplexity": held.get(f"{side}_perplexity"),
        "exact_match": gen.get(f"{side}_exact_match"),
        "chrf": gen.get(f"{side}_chrf"),
        "general_loss": forget.get(f"{side}_loss"),
        # the mean KL(candidate || base) on the general set, from its training (the gate reports it)
        "general_kl": forget.get("candidate_kl") if side == "candidate" else None,
    }
    if side == "candidate" and held.get("improvement") is not None:
        out.update(improvement=held["improvement"], ci_low=held.get("ci_low"), ci_high=held.get("ci_high"),
                   compared_with=m.get("champion"))
    return {k: v for k, v in out.items() if v is not None}


def active_adapter_doc(row: dict[str, Any] | None, *, base_model: str, reason: str, now: datetime,
                       payload: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `active_adapter.json` says. `adapter_path: null` means: no adapter, run the base model."""
    if row is None:
        return {"adapter_id": None, "version": None, "adapter_path": None, "adapter_sha256": None,
                "gguf_path": None, "modelfile_path": None, "ollama_model": None, "base_model": base_model,
                "activated_at": iso(now), "reason": reason, "source": "academyd"}
    artifacts = row.get("artifacts") or {}
    return {"adapter_id": row["version"], "version": row["version"], "adapter_path": row["adapter_path"],
            "adapter_sha256": row["adapter_sha256"], "gguf_path": artifacts.get("gguf_path"),
            "modelfile_path": artifacts.get("modelfile_path"), "ollama_model": OLLAMA_PREFIX + row["version"],
            "base_model": row["base_model"], "parent_version": row.get("parent"), "activated_at": iso(now),
            "reason": reason, "source": "academyd",
            "metrics": (payload or {}).get("metrics") or summary_metrics(row)}


def write_active_adapter(settings: Settings, doc: dict[str, Any]) -> Path:
    path = settings.active_adapter_path
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, doc)
    return path


_WRITE_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def _write_lock() -> asyncio.Lock:
    return _WRITE_LOCKS.setdefault(asyncio.get_running_loop(), asyncio.Lock())


async def write_active_adapter_async(settings: Settings, doc: dict[str, Any]) -> Path:
    """`write_active_adapter` off the event loop (an fsync'd file and directory). Moves call it right after
    their commit without yielding first, and the lock is first-come first-served: the file is written in
    commit order, so it ends naming the last champion committed."""
    async with _write_lock():
        return await asyncio.to_thread(write_active_adapter, settings, doc)


async def sync_active_adapter_async(settings: Settings, now: datetime) -> bool:
    """`sync_active_adapter` off the event loop, on a connection of its own (the daemon's is the loop's)."""

    def work() -> bool:
        store = Store(settings.db_path)
        try:
            return sync_active_adapter(store, settings, now)
        finally:
            store.close()

    async with _write_lock():
        return await asyncio.to_thread(work)


def sync_active_adapter(store: Store, settings: Settings, now: datetime) -> bool:
    """Rewrite `active_adapter.json` when it does not name the registry's champion; True if rewritten.
    Only versions the registry knows are touched: with no champion and no file, nothing is written."""
    reg = Registry(store, settings)
    champ = reg.champion()
    path = settings.active_adapter_path
    current = None
    if path.is_file():
        try:
            current = json.loads(path.read_text()).get("version")
        except (ValueError, AttributeError):
            current = "?"
    want = champ["version"] if champ else None
    if current == want and (path.is_file() or champ is None):
        return False
    if champ is None and not path.is_file():
        return False
    base = champ["base_model"] if champ else (settings.training.base_model or "")
    write_active_adapter(settings, active_adapter_doc(champ, base_model=base, reason="resynchronised at start",
                                                      now=now))
    return True
