"""Tasks to a decision after a promotion: the anytime-valid monitor (academyd.anytime) against the old
windowed z-test (academyd.watch.decide, window 50, alpha 0.05, margin 0.05) on the same streams.

    .venv/bin/python bench/bench_monitor.py [--streams 2000] [--tasks 1000]

Seeded simulation (the parent's past record at 80 %, the champion checked after every task). Prints, per
case, the share of streams decided and the tasks to a decision (median, 90th percentile; `>T` when fewer
than that share decided within the horizon). Not a test: tests/arena/test_anytime.py asserts the bars.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from academyd.anytime import paths  # noqa: E402
from arena.test_anytime import old_rollbacks  # noqa: E402



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=2000)
    ap.add_argument("--tasks", type=int, default=1000)
    a = ap.parse_args()
    big = 10**9
    for champ_rate, parent_n in ((0.7, 1000), (0.7, 300), (0.8, 1000), (0.8, 300)):
        rng = np.random.default_rng(int(champ_rate * 100) + parent_n)
        parent = rng.random((a.streams, parent_n)) < 0.8
        champ = rng.random((a.streams, a.tasks)) < champ_rate
        t0 = time.perf_counter()
        down, up = paths(champ, parent.sum(axis=1), np.full(a.streams, parent_n))
        elapsed = time.perf_counter() - t0
        first = np.minimum(np.where(down > 0, down, big), np.where(up > 0, up, big))
        rolled = (down > 0) & ((up == 0) | (down <= up))
        confirmed = (up > 0) & ~rolled
        decided = first < big
        old = old_rollbacks(parent, champ)
        q = lambda x, p: f"{np.percentile(np.where(x > 0, x, big), p):.0f}" if np.mean(x > 0) >= p / 100 else f">{a.tasks}"  # noqa: E731
        print(f"champion {champ_rate:.0%} vs parent 80 % over {parent_n} tasks ({a.streams} streams, {a.tasks} tasks,"
              f" {elapsed:.2f} s):")
        print(f"  anytime: decided {decided.mean():.1%} (rolled back {rolled.mean():.1%}, confirmed "
              f"{confirmed.mean():.1%}); tasks to a decision median {q(np.where(decided, first, 0), 50)}, "
              f"p90 {q(np.where(decided, first, 0), 90)}; to a rollback median {q(np.where(rolled, down, 0), 50)}, "
              f"p90 {q(np.where(rolled, down, 0), 90)}")
        print(f"  old windowed z-test: rolled back {np.mean(old > 0):.1%}; median {q(old, 50)}, p90 {q(old, 90)}")


if __name__ == "__main__":
    main()
