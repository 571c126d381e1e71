"""Which version served a task, how far along the task is, and what its answer says (pure).

Venom never writes `model_version`; since 2026-03 it records the serving model on every orchestrated task
as `context_history.llm_runtime` (`adapter_applied`, `adapter_id`, `model`, ...; see
shared/venom/academy-api.md, "Which model served a task"). So:

- `model_version` when a publisher sets it (our own publishers and tests);
- else `llm_runtime.adapter_id` when `adapter_applied` (the `venom-adapter-` prefix dropped if present);
- else `base` when `llm_runtime` says no adapter was applied: the base model is a version of its own, so
  the first promotion (over the base) has a parent record to be compared with;
- else unknown (None): the task counts for nothing in the watch.

A task's status only moves forward: PENDING < PROCESSING < COMPLETED | FAILED (anything else Venom may
write counts as finished). A later event with a status at or below the stored one changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

BASE = "base"
ADAPTER_PREFIX = "venom-adapter-"
RANKS = {"PENDING": 0, "PROCESSING": 1}
FINISHED_RANK = 2


def served_version(model_version: str | None, context_history: Any) -> str | None:
    if model_version:
        return model_version
    runtime = context_history.get("llm_runtime") if isinstance(context_history, dict) else None
    if not isinstance(runtime, dict):
        return None
    if runtime.get("adapter_applied") is True:
        adapter = runtime.get("adapter_id")
        if not adapter and isinstance(runtime.get("model"), str):
            adapter = runtime["model"]
        if isinstance(adapter, str) and adapter:
            return adapter.removeprefix(ADAPTER_PREFIX)[:200]
        return None
    if runtime.get("adapter_applied") is False:
        return BASE
    return None


def status_rank(status: str) -> int:
    """PENDING 0, PROCESSING 1, anything else (COMPLETED, FAILED, ...) finished: 2."""
    return RANKS.get(status.strip().upper(), FINISHED_RANK)


def is_empty(result: str | None) -> bool:
    return result is None or not result.strip()


def leaks(result: str | None, markers: Iterable[str]) -> bool:
    """Whether the answer holds a chat-template token (the model is writing the template, not answering)."""
    return bool(result) and any(m in result for m in markers)  # type: ignore[operator]
