"""The OLD post-promotion watch, replaced by academyd.anytime (#20) and no longer used by the monitor
(academyd.champion.monitor). Kept as the baseline tests/arena/test_anytime.py and bench/bench_monitor.py
measure the new test against: re-run after every task, this windowed z-test peeks (2,000 simulated
streams, no change, 1,000 tasks: 25-26 % false rollbacks at a nominal 5 %).

The post-promotion watch: is the champion doing worse in Venom than the version it replaced?

`task.completed` events that name a `model_version` give each version a success rate. The champion is
compared with its parent (the version a rollback would restore, `academyd.champion.moves.rollback_target`) over
the last `arena.watch_window` tasks of each. The question is one-sided with a margin:

    H0: p_champion >= p_parent - margin        H1: p_champion < p_parent - margin

tested with a two-proportion z-test (unpooled standard error, as the null hypothesis is not p1 = p2). The
watch recommends a rollback when H0 is rejected at `arena.watch_alpha`. Until both versions have a full
window of tasks it says nothing. A champion with no parent (the base model before it) is not watched: no
version names the base model's tasks.

Pure parts (`two_proportion_test`, `decide`) take plain numbers; `check_champion` reads the store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from academyd.settings import Settings
from academyd.store import Store


@dataclass(frozen=True)
class WatchDecision:
    """`rollback` true: the champion is worse than its parent beyond noise; `reason` says by how much."""

    rollback: bool
    reason: str
    stats: dict[str, Any] = field(default_factory=dict)


def _norm_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def two_proportion_test(
    successes_a: int, n_a: int, successes_b: int, n_b: int, *, margin: float = 0.0
) -> dict[str, float]:
    """One-sided test that proportion A (the champion) is below proportion B (the parent) minus `margin`.

    Returns {p_a, p_b, diff (p_b - p_a), z, p_value}: a small p_value means A is worse by more than the
    margin. With no variance at all (both rates 0 or 1) the p-value is 0 when diff > margin, else 1.
    """
    if n_a <= 0 or n_b <= 0:
        raise ValueError("both samples need at least one task")
    if not (0 <= successes_a <= n_a and 0 <= successes_b <= n_b):
        raise ValueError("successes must lie between 0 and the sample size")
    p_a, p_b = successes_a / n_a, successes_b / n_b
    diff = p_b - p_a
    se = math.sqrt(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
    if se == 0.0:
        z = math.inf if diff > margin else -math.inf
        p_value = 0.0 if diff > margin else 1.0
    else:
        z = (diff - margin) / se
        p_value = _norm_sf(z)
    return {"p_a": p_a, "p_b": p_b, "diff": diff, "z": z, "p_value": p_value}


def decide(
    champion: str, champ_outcomes: list[bool], parent: str | None, parent_outcomes: list[bool], *,
    window: int, alpha: float, margin: float,
) -> WatchDecision:
    """The rollback decision from the two versions' latest outcomes (most recent `window` of each)."""
    champ = champ_outcomes[-window:]
    par = parent_outcomes[-window:]
    stats: dict[str, Any] = {"champion": champion, "parent": parent, "window": window, "alpha": alpha,
                             "margin": margin, "champion_tasks": len(champ), "parent_tasks": len(par)}
    if parent is None:
        return WatchDecision(False, f"{champion} has no parent version to compare with", stats)
    if len(champ) < window or len(par) < window:
        return WatchDecision(False, f"not enough tasks yet: {champion} {len(champ)}, {parent} {len(par)} "
                             f"(need {window} each)", stats)
    test = two_proportion_test(sum(champ), len(champ), sum(par), len(par), margin=margin)
    stats.update(champion_rate=test["p_a"], parent_rate=test["p_b"], diff=test["diff"], z=test["z"],
                 p_value=test["p_value"])
    summary = (f"{champion} succeeded in {sum(champ)}/{len(champ)} tasks ({test['p_a']:.0%}), {parent} in "
               f"{sum(par)}/{len(par)} ({test['p_b']:.0%}); one-sided two-proportion test of a drop beyond "
               f"{margin:.0%}: z={test['z']:.2f}, p={test['p_value']:.4f}")
    if test["p_value"] < alpha:
        return WatchDecision(True, f"{summary} < {alpha}: roll back to {parent}", stats)
    return WatchDecision(False, f"{summary} >= {alpha}: within noise, keep {champion}", stats)


def check_champion(
    store: Store, settings: Settings, champion: dict[str, Any], parent: dict[str, Any] | None
) -> WatchDecision:
    """Compare the champion with `parent` (pass `promotion.rollback_target(...)`) over the last
    `arena.watch_window` tasks of each; the pipeline rolls back when `rollback` is true."""
    a = settings.arena
    version = champion["version"]
    pv = parent["version"] if parent else None
    return decide(
        version, store.task_outcomes(version, a.watch_window), pv,
        store.task_outcomes(pv, a.watch_window) if pv else [], window=a.watch_window, alpha=a.watch_alpha,
        margin=a.watch_margin,
    )
