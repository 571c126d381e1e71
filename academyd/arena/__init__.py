"""The arena: a candidate adapter against the champion (or the base model) on data it never saw.

Daemon side (no torch): `evaluate(settings, ...) -> Verdict` (academyd.arena.contest) runs the measurement
in the trainer's environment and applies the gate, a pure function (academyd.arena.gate.decide).
Trainer side: `python -m academyd.arena.measure` (torch) and `python -m academyd.arena.export_gguf`.

Names are imported lazily so that the trainer-side modules, run as `python -m academyd.arena.<x>` in the
trainer's environment, do not pull the daemon's dependencies in through this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from academyd.arena.contest import ArenaError, evaluate
    from academyd.arena.gate import Verdict, decide

__all__ = ["ArenaError", "Verdict", "decide", "evaluate"]


def __getattr__(name: str) -> Any:
    if name in ("evaluate", "ArenaError"):
        from academyd.arena import contest

        return getattr(contest, name)
    if name in ("Verdict", "decide"):
        from academyd.arena import gate

        return getattr(gate, name)
    raise AttributeError(f"module 'academyd.arena' has no attribute {name!r}")
