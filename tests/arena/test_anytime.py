"""The anytime-valid monitor's statistics (academyd.anytime), shown by simulation: pure, seeded, numpy.

Every case: 2,000 streams, the parent's past record drawn at 80 % success, the champion's outcomes
checked after every task up to 1,000 (or 400) tasks. The old windowed z-test (academyd.watch.decide,
default window 50, alpha 0.05, margin 0.05) runs on the same streams: vectorised here, and checked
against `watch.decide` itself on a sample of (stream, task) points first.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from academyd.anytime import judge, lower_bound, paths, upper_bound
from academyd.watch import decide

STREAMS = 2000
PARENT_RATE = 0.8
Z_95 = 1.6448536269514722  # the old test's one-sided 5 % critical value


def simulate(champion_rate: float, parent_tasks: int, tasks: int, seed: int) -> dict[str, npt.NDArray]:
    rng = np.random.default_rng(seed)
    parent = rng.random((STREAMS, parent_tasks)) < PARENT_RATE
    champ = rng.random((STREAMS, tasks)) < champion_rate
    down, up = paths(champ, parent.sum(axis=1), np.full(STREAMS, parent_tasks))
    rolled = (down > 0) & ((up == 0) | (down <= up))
    confirmed = (up > 0) & ((down == 0) | (up < down))
    return {"parent": parent, "champ": champ, "rolled": rolled, "rolled_at": np.where(rolled, down, 0),
            "confirmed": confirmed, "confirmed_at": np.where(confirmed, up, 0)}


def old_fires(parent: npt.NDArray[np.bool_], champ: npt.NDArray[np.bool_], *, window: int = 50,
              margin: float = 0.05) -> npt.NDArray[np.bool_]:
    """Whether the old watch says roll back after task t, for t = window..T (column t - window)."""
    pb = parent[:, -window:].sum(axis=1, keepdims=True) / window
    s = np.concatenate([np.zeros((len(champ), 1)), np.cumsum(champ, axis=1)], axis=1)
    pa = (s[:, window:] - s[:, :-window]) / window  # the champion's last `window` after tasks window..T
    diff = pb - pa
    se = np.sqrt(pa * (1 - pa) / window + pb * (1 - pb) / window)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(np.where(se == 0, diff > margin, (diff - margin) / se > Z_95), dtype=bool)


def old_rollbacks(parent: npt.NDArray[np.bool_], champ: npt.NDArray[np.bool_], window: int = 50
                  ) -> npt.NDArray[np.int64]:
    """The task at which the old watch first said roll back (0: never): `watch.decide` after every task."""
    fire = old_fires(parent, champ, window=window)
    return np.where(fire.any(axis=1), fire.argmax(axis=1) + window, 0)


@pytest.fixture(scope="module")
def no_change_300() -> dict[str, npt.NDArray]:
    return simulate(0.8, 300, 1000, seed=300)


@pytest.fixture(scope="module")
def no_change_1000() -> dict[str, npt.NDArray]:
    return simulate(0.8, 1000, 1000, seed=1000)


def test_the_vectorised_old_watch_is_watch_decide() -> None:
    sim = simulate(0.7, 300, 200, seed=7)
    fire = old_fires(sim["parent"], sim["champ"])
    assert fire.any() and not fire.all()
    rng = np.random.default_rng(0)
    for i in rng.choice(STREAMS, 60, replace=False):
        parent = sim["parent"][i].tolist()
        for t in (49, 50, 75, 120, 200):
            d = decide("v2", sim["champ"][i, :t].tolist(), "v1", parent, window=50, alpha=0.05, margin=0.05)
            assert d.rollback == (t >= 50 and bool(fire[i, t - 50])), (i, t, d.reason)


@pytest.mark.parametrize("case", ["no_change_300", "no_change_1000"])
def test_no_change_is_rarely_rolled_back_and_the_old_watch_often_was(case: str, request: pytest.FixtureRequest
                                                                      ) -> None:
    sim = request.getfixturevalue(case)
    false_rollbacks = sim["rolled"].mean()
    old = (old_rollbacks(sim["parent"], sim["champ"]) > 0).mean()
    print(f"{case}: false rollbacks within 1,000 tasks: anytime {false_rollbacks:.2%}, old windowed z-test {old:.2%}")
    assert false_rollbacks <= 0.05
    assert old > 0.05  # why it was replaced: it peeks


@pytest.mark.parametrize("case", ["no_change_300", "no_change_1000"])
def test_no_change_is_confirmed(case: str, request: pytest.FixtureRequest) -> None:
    sim = request.getfixturevalue(case)
    at = sim["confirmed_at"][sim["confirmed"]]
    print(f"{case}: confirmed within 1,000 tasks {sim['confirmed'].mean():.2%}, median task {np.median(at):.0f}")
    assert sim["confirmed"].mean() >= 0.80


def test_a_drop_to_60_against_300_parent_tasks_is_rolled_back_fast() -> None:
    sim = simulate(0.6, 300, 400, seed=60)
    old = old_rollbacks(sim["parent"], sim["champ"])
    med = np.median(np.where(sim["rolled"], sim["rolled_at"], 10**9))
    print(f"80 -> 60 %, parent 300: rolled back {sim['rolled'].mean():.2%} within 400, median {med:.0f}; "
          f"old {np.mean(old > 0):.2%}, median {np.median(np.where(old > 0, old, 10**9)):.0f}")
    assert sim["rolled"].mean() >= 0.95
    assert med <= 100
    assert not sim["confirmed"].any()


def test_a_drop_to_70_against_1000_parent_tasks_is_rolled_back() -> None:
    sim = simulate(0.7, 1000, 1000, seed=70)
    med = np.median(np.where(sim["rolled"], sim["rolled_at"], 10**9))
    print(f"80 -> 70 %, parent 1000: rolled back {sim['rolled'].mean():.2%} within 1,000, median {med:.0f}")
    assert sim["rolled"].mean() >= 0.90
    assert med <= 300
    assert sim["confirmed"].mean() <= 0.05  # a champion 10 points worse is not `confirmed` (the margin's edge)


# ---------------------------------------------------------------- the pieces, table-driven


@pytest.mark.parametrize(("s", "n", "alpha", "lo", "hi"), [
    (10, 10, 0.05, 0.05 ** (1 / 10), 1.0),       # all successes: the closed form
    (0, 10, 0.05, 0.0, 1 - 0.05 ** (1 / 10)),
    (240, 300, 0.025, 0.7502, 0.8438),            # Clopper-Pearson, as tabulated
    (0, 0, 0.05, 0.0, 1.0),                       # no record: no information
])
def test_exact_bounds(s: int, n: int, alpha: float, lo: float, hi: float) -> None:
    assert float(lower_bound(s, n, alpha)) == pytest.approx(lo, abs=1e-4)
    assert float(upper_bound(s, n, alpha)) == pytest.approx(hi, abs=1e-4)


def test_exact_bound_coverage() -> None:
    """The parent's bound is on the wrong side at most alpha of the time (here 2.5 %)."""
    rng = np.random.default_rng(5)
    for n in (30, 300):
        s = rng.binomial(n, 0.8, size=20000)
        assert (lower_bound(s, np.full_like(s, n), 0.025) > 0.8).mean() <= 0.025
        assert (upper_bound(s, np.full_like(s, n), 0.025) < 0.8).mean() <= 0.025


def test_judge_states() -> None:
    good = [i % 5 != 0 for i in range(400)]          # 80 %
    bad = [i % 5 in (1, 2, 3) for i in range(400)]    # 60 %
    kw = {"alpha": 0.05, "rollback_margin": 0.0, "confirm_margin": 0.10}
    assert judge([], 800, 1000, **kw).state == "watching"
    assert judge(good[:20], 800, 1000, **kw).reason.startswith("watching (20 tasks)")
    j = judge(bad, 800, 1000, **kw)
    assert j.state == "rolled_back" and 0 < j.at_task < 100
    # the decision is where the stream crossed, however late it is looked at
    assert judge(bad[: j.at_task], 800, 1000, **kw).at_task == j.at_task
    c = judge(good, 800, 1000, **kw)
    assert c.state == "confirmed" and c.stats["cs_lower"] <= 0.8 <= c.stats["cs_upper"]
    # a rollback margin of 10 points: 80 -> 70 % is within it
    assert judge([i % 10 < 7 for i in range(400)], 800, 1000, alpha=0.05, rollback_margin=0.10,
                 confirm_margin=0.2).state != "rolled_back"
