"""Anytime-valid comparison of a champion's success rate with its parent's past record (pure, numpy only).

The question after a promotion is one-sided: is the champion worse than the version it replaced?

    rollback test     H0: p_champion >= p_parent - rollback_margin     (rejected: `rolled_back`)
    confirmation      H0': p_champion <= p_parent - confirm_margin      (rejected: `confirmed`)

The parent's record is a fixed sample (s_p successes in n_p tasks), so its rate counts with its own
uncertainty: its exact one-sided (Clopper-Pearson) bound at level alpha/2, valid for every n_p (no
normal approximation; `lower_bound`, `upper_bound`). The champion's tasks arrive one at a time and are
looked at after every task, so its half of the error budget (alpha/2) is spent by an e-process:

    E_t(p0) = sum_j w_j * prod_{i<=t} (p_j / p0)^x_i ((1 - p_j) / (1 - p0))^(1 - x_i),   p_j < p0

a discrete mixture of likelihood ratios of alternatives below p0 (a mixture sequential probability ratio
test: Robbins 1970, "Statistical methods related to the law of the iterated logarithm"; Johari, Koomen,
Pekelis & Walsh 2022, "Always valid inference: continuous monitoring of A/B tests", Operations Research
70(3); the discrete mixture of Howard, Ramdas, McAuliffe & Sekhon 2021, "Time-uniform, nonparametric,
nonasymptotic confidence sequences", Annals of Statistics 49(2), section 3). Each term has expectation
<= 1 under any p >= p0 (a nonnegative supermartingale: q p_j/p0 + (1-q)(1-p_j)/(1-p0) <= 1 for q >= p0
when p_j < p0), so by Ville's inequality P(sup_t E_t >= 2/alpha) <= alpha/2 however often one looks.
With p0 = LCB_parent - margin, a false rollback needs the parent's bound to fail or the e-process to
cross: type-I error <= alpha/2 + alpha/2 = alpha. The confirmation is the mirror image (alternatives above
q0 = UCB_parent - confirm_margin), with the same guarantee for a false `confirmed`.

`paths` evaluates the e-processes for many streams at once (a (streams, tasks) array of outcomes, with a
per-stream parent), which is what the simulation tests and the bench use; `judge` is the daemon's
single-stream decision over the outcomes so far, in order, so the verdict does not depend on how often
the monitor ticks: a crossing at task 37 seen at task 80 is still a crossing at task 37.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

# Drops the rollback mixture puts its weight on: 3 to 30 points below the parent's bound, geometrically
# spaced, equal weights. A regression of a fine-tuned adapter is a few to tens of points; the small terms
# keep power for small drops on long streams, the large ones catch a broken model within a few dozen
# tasks. (Tuned by simulation, tests/arena/test_anytime.py: 12 terms from 1 to 40 points lost 30 tasks of
# median delay at 80 -> 70 % for nothing; one term is blind to the drops it was not tuned for.)
ROLLBACK_GRID = tuple(float(d) for d in np.geomspace(0.03, 0.30, 6))
# Gains the confirmation mixture weighs, as fractions of the confirmation margin: a champion as good as
# its parent sits about one margin, less the parent's own uncertainty, above the confirmation line.
CONFIRM_GRID = (0.30, 0.45, 0.67, 1.0)


def _binom_tail(successes: int, n: int, q: npt.NDArray[np.float64], *, at_least: bool) -> npt.NDArray[np.float64]:
    """P(Bin(n, q) >= successes) (at_least) or P(Bin(n, q) <= successes), for a vector of rates q."""
    k = np.arange(n + 1, dtype=float)
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=float)))])
    log_choose = log_fact[n] - log_fact - log_fact[::-1]
    qq = np.clip(q, 1e-300, 1 - 1e-16)[:, None]
    log_pmf = log_choose[None, :] + k[None, :] * np.log(qq) + (n - k)[None, :] * np.log1p(-qq)
    pick = k >= successes if at_least else k <= successes
    return np.asarray(np.exp(log_pmf[:, pick]).sum(axis=1), dtype=float)


def _exact_bound(successes: int, n: int, alpha: float, *, upper: bool) -> float:
    """Clopper-Pearson one-sided bound by bisection (exact: P(bound on the wrong side) <= alpha)."""
    if n <= 0:
        return 1.0 if upper else 0.0
    if (upper and successes >= n) or (not upper and successes <= 0):
        return 1.0 if upper else 0.0
    lo, hi = np.zeros(1), np.ones(1)
    for _ in range(60):
        mid = (lo + hi) / 2
        if upper:  # the largest q with P(X <= s | q) >= alpha
            ok = _binom_tail(successes, n, mid, at_least=False) >= alpha
            lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
        else:      # the smallest q with P(X >= s | q) >= alpha
            ok = _binom_tail(successes, n, mid, at_least=True) >= alpha
            lo, hi = np.where(ok, lo, mid), np.where(ok, mid, hi)
    return float(lo[0] if upper else hi[0])


def _bounds(successes: npt.ArrayLike, n: npt.ArrayLike, alpha: float, *, upper: bool) -> npt.NDArray[np.float64]:
    s = np.asarray(successes, dtype=int)
    m = np.broadcast_to(np.asarray(n, dtype=int), s.shape)
    pairs = np.stack([s.ravel(), m.ravel()], axis=1)
    uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
    vals = np.array([_exact_bound(int(a), int(b), alpha, upper=upper) for a, b in uniq])
    return vals[inverse.ravel()].reshape(s.shape)


def lower_bound(successes: npt.ArrayLike, n: npt.ArrayLike, alpha: float) -> npt.NDArray[np.float64]:
    """One-sided exact (Clopper-Pearson) lower confidence bound of a binomial rate: P(bound > p) <= alpha."""
    return _bounds(successes, n, alpha, upper=False)


def upper_bound(successes: npt.ArrayLike, n: npt.ArrayLike, alpha: float) -> npt.NDArray[np.float64]:
    """One-sided exact (Clopper-Pearson) upper confidence bound of a binomial rate: P(bound < p) <= alpha."""
    return _bounds(successes, n, alpha, upper=True)


def log_evidence(successes: npt.NDArray[np.float64], failures: npt.NDArray[np.float64],
                 null: npt.ArrayLike, *, below: bool, grid: tuple[float, ...]) -> npt.NDArray[np.float64]:
    """log E_t of the mixture against the null rate `null` (broadcast against the counts): alternatives
    `null - d` when `below` (evidence of a drop), `null + d` otherwise (evidence of no drop), d in `grid`,
    equal weights. Terms whose alternative falls outside (0, 1) are left out (their weight kept: valid)."""
    p0 = np.clip(np.asarray(null, dtype=float), 1e-9, 1 - 1e-9)
    acc: npt.NDArray[np.float64] | None = None
    for d in grid:
        p1 = p0 - d if below else p0 + d
        ok = (p1 > 0) & (p1 < 1)
        p1 = np.clip(p1, 1e-9, 1 - 1e-9)
        term = successes * np.log(p1 / p0) + failures * np.log((1 - p1) / (1 - p0))
        term = np.where(ok, term, -np.inf)
        acc = term if acc is None else np.logaddexp(acc, term)
    assert acc is not None
    return np.asarray(acc - math.log(len(grid)), dtype=float)


def confirm_grid(confirm_margin: float) -> tuple[float, ...]:
    return tuple(confirm_margin * g for g in CONFIRM_GRID) if confirm_margin > 0 else ROLLBACK_GRID


@dataclass(frozen=True)
class Bounds:
    """The lines a champion is measured against, from the parent's record."""

    rollback_below: float  # p0: the parent's lower bound minus the rollback margin
    confirm_above: float   # q0: the parent's upper bound minus the confirmation margin
    parent_rate: float
    parent_lower: float
    parent_upper: float


def bounds(parent_successes: int, parent_tasks: int, *, alpha: float, rollback_margin: float,
           confirm_margin: float) -> Bounds:
    lo = float(lower_bound(parent_successes, parent_tasks, alpha / 2))
    hi = float(upper_bound(parent_successes, parent_tasks, alpha / 2))
    return Bounds(rollback_below=lo - rollback_margin, confirm_above=hi - confirm_margin,
                  parent_rate=parent_successes / parent_tasks if parent_tasks else float("nan"),
                  parent_lower=lo, parent_upper=hi)


def paths(outcomes: npt.NDArray[np.bool_], parent_successes: npt.ArrayLike, parent_tasks: npt.ArrayLike, *,
          alpha: float = 0.05, rollback_margin: float = 0.0, confirm_margin: float = 0.10,
          ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """For each stream (a row of `outcomes`, one parent each), the task (1-based) at which it is rolled
    back and at which it is confirmed; 0: never within the row. Whichever comes first is the decision."""
    x = np.asarray(outcomes, dtype=float)
    s = np.cumsum(x, axis=1)
    f = np.arange(1, x.shape[1] + 1)[None, :] - s
    ps = np.asarray(parent_successes, dtype=float).reshape(-1, 1)
    pn = np.asarray(parent_tasks, dtype=float).reshape(-1, 1)
    p0 = lower_bound(ps, pn, alpha / 2) - rollback_margin
    q0 = upper_bound(ps, pn, alpha / 2) - confirm_margin
    threshold = math.log(2.0 / alpha)
    down = log_evidence(s, f, p0, below=True, grid=ROLLBACK_GRID) >= threshold
    up = log_evidence(s, f, q0, below=False, grid=confirm_grid(confirm_margin)) >= threshold
    first = (lambda hit: np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, 0))
    return first(down), first(up)


@dataclass(frozen=True)
class Judgement:
    """`state`: `rolled_back` (the champion is worse), `confirmed` (no worse than the confirmation margin)
    or `watching`; `at_task`: the champion's task at which the decision came (0 while watching)."""

    state: str
    at_task: int
    reason: str
    stats: dict[str, Any] = field(default_factory=dict)


def judge(outcomes: list[bool], parent_successes: int, parent_tasks: int, *, alpha: float,
          rollback_margin: float, confirm_margin: float, cs: tuple[float, float] | None = None) -> Judgement:
    """The decision over the champion's outcomes so far, in order (the first crossing wins). `cs`: the
    confidence sequence now, when the caller computed its path already."""
    n = len(outcomes)
    b = bounds(parent_successes, parent_tasks, alpha=alpha, rollback_margin=rollback_margin,
               confirm_margin=confirm_margin)
    successes = sum(outcomes)
    stats: dict[str, Any] = {
        "tasks": n, "successes": successes, "rate": successes / n if n else None,
        "parent_tasks": parent_tasks, "parent_successes": parent_successes, "parent_rate": b.parent_rate,
        "parent_lower": b.parent_lower, "parent_upper": b.parent_upper, "rollback_below": b.rollback_below,
        "confirm_above": b.confirm_above, "alpha": alpha, "rollback_margin": rollback_margin,
        "confirm_margin": confirm_margin,
    }
    lo, hi = cs if cs is not None else confidence_sequence(outcomes, alpha)
    stats.update(cs_lower=lo, cs_upper=hi)
    if n == 0:
        return Judgement("watching", 0, "watching (0 tasks)", stats)
    down, up = paths(np.asarray([outcomes], dtype=bool), [parent_successes], [parent_tasks], alpha=alpha,
                     rollback_margin=rollback_margin, confirm_margin=confirm_margin)
    d, u = int(down[0]), int(up[0])

    def summary(k: int) -> str:
        ok = sum(outcomes[:k])
        return (f"{ok}/{k} tasks succeeded ({ok / k:.0%}); parent {parent_successes}/{parent_tasks} "
                f"({b.parent_rate:.0%}, {1 - alpha / 2:.1%} bounds {b.parent_lower:.0%}-{b.parent_upper:.0%})")

    if d and (not u or d <= u):
        return Judgement("rolled_back", d, f"worse than the parent (below {b.rollback_below:.1%}) at "
                         f"{1 - alpha:.0%} confidence after {d} tasks: {summary(d)}", stats)
    if u:
        return Judgement("confirmed", u, f"no worse than the parent minus {confirm_margin:.0%} (above "
                         f"{b.confirm_above:.1%}) at {1 - alpha:.0%} confidence after {u} tasks: {summary(u)}", stats)
    return Judgement("watching", 0, f"watching ({n} tasks): {summary(n)}", stats)


def confidence_path(outcomes: list[bool], alpha: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The champion's running (1 - alpha) confidence sequence after each task: the rates p no one-sided
    mixture test (the e-processes above, alpha/2 each side, tested at p) has rejected at any task so far,
    to 0.001 (for the page: the band narrows as tasks come, and never widens)."""
    x = np.asarray(outcomes, dtype=float)[None, :]
    n = x.shape[1]
    s = np.cumsum(x, axis=1)
    f = np.arange(1, n + 1)[None, :] - s
    rates = np.linspace(0.0, 1.0, 1001)
    threshold = math.log(2.0 / alpha)
    out = np.zeros((len(rates), n), dtype=bool)
    for i in range(0, len(rates), 64):  # in slices: memory stays small for long streams
        r = rates[i:i + 64, None]
        hit = (log_evidence(s, f, r, below=True, grid=ROLLBACK_GRID) >= threshold) | (
            log_evidence(s, f, r, below=False, grid=ROLLBACK_GRID) >= threshold)
        out[i:i + 64] = np.logical_or.accumulate(hit, axis=1)  # once out, out for good
    keep = ~out
    rate = s[0] / np.arange(1, n + 1)
    any_kept = keep.any(axis=0)
    lo = np.where(any_kept, rates[np.argmax(keep, axis=0)], rate)
    hi = np.where(any_kept, rates[len(rates) - 1 - np.argmax(keep[::-1], axis=0)], rate)
    return lo, hi


def confidence_sequence(outcomes: list[bool], alpha: float) -> tuple[float, float]:
    """The champion's confidence sequence now (after its last task)."""
    if not outcomes:
        return 0.0, 1.0
    lo, hi = confidence_path(outcomes, alpha)
    return float(lo[-1]), float(hi[-1])
