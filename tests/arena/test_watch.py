"""The post-promotion watch: the two-proportion test (pure) and the decision over a real store."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from academyd.settings import Settings
from academyd.store import Store
from academyd.watch import check_champion, decide, two_proportion_test
from schemas.models import TaskCompleted

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("a", "n_a", "b", "n_b", "margin", "p_below"),
    [
        (25, 50, 45, 50, 0.05, 0.001),   # a big drop: very significant
        (42, 50, 45, 50, 0.05, None),    # a small drop: not significant
        (45, 50, 45, 50, 0.0, None),     # no drop at all
        (0, 50, 50, 50, 0.05, 0.001),    # no variance, drop beyond the margin
        (50, 50, 50, 50, 0.05, None),    # no variance, no drop
    ],
)
def test_two_proportion_table(a: int, n_a: int, b: int, n_b: int, margin: float, p_below: float | None) -> None:
    t = two_proportion_test(a, n_a, b, n_b, margin=margin)
    assert t["diff"] == pytest.approx(b / n_b - a / n_a)
    if p_below is None:
        assert t["p_value"] > 0.05
    else:
        assert t["p_value"] < p_below


def test_two_proportion_matches_the_formula() -> None:
    t = two_proportion_test(30, 60, 48, 60, margin=0.1)
    se = math.sqrt(0.5 * 0.5 / 60 + 0.8 * 0.2 / 60)
    z = (0.3 - 0.1) / se
    assert t["z"] == pytest.approx(z)
    assert t["p_value"] == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)))
    with pytest.raises(ValueError):
        two_proportion_test(1, 0, 1, 1)


def test_the_margin_matters() -> None:
    """A drop of 0.1 is significant against no margin but not against a margin of 0.1."""
    assert two_proportion_test(160, 200, 180, 200)["p_value"] < 0.05
    assert two_proportion_test(160, 200, 180, 200, margin=0.1)["p_value"] > 0.4


def outcomes(successes: int, n: int) -> list[bool]:
    # spread the failures so that any window sees the same rate
    return [(i * successes) // n != ((i + 1) * successes) // n for i in range(n)]


@pytest.mark.parametrize(
    ("champ", "parent", "rollback", "says"),
    [
        (outcomes(20, 50), outcomes(45, 50), True, "roll back to v1"),
        (outcomes(42, 50), outcomes(45, 50), False, "within noise"),
        (outcomes(10, 20), outcomes(45, 50), False, "not enough tasks"),
        (outcomes(10, 50) + outcomes(49, 50), outcomes(45, 50), False, "within noise"),  # only the last window
    ],
)
def test_decide_table(champ: list[bool], parent: list[bool], rollback: bool, says: str) -> None:
    d = decide("v2", champ, "v1", parent, window=50, alpha=0.05, margin=0.05)
    assert d.rollback is rollback, d.reason
    assert says in d.reason


def test_no_parent_is_not_watched() -> None:
    d = decide("v1", outcomes(0, 50), None, [], window=50, alpha=0.05, margin=0.05)
    assert not d.rollback and "no parent" in d.reason


def _tasks(store: Store, version: str, successes: int, n: int, start: int) -> None:
    with store.transaction():
        for i, ok in enumerate(outcomes(successes, n)):
            ev = TaskCompleted(schema_version=1, event_id=f"t-{version}-{start + i}", task_id=f"{version}-{start + i}",
                               content="do it", result="done" if ok else "failed",
                               status="COMPLETED" if ok else "FAILED", model_version=version)
            store.claim(ev.event_id, "task.completed", None, NOW)
            store.insert_task(ev, ok, NOW)


def test_check_champion_over_the_store(tmp_path: object) -> None:
    settings = Settings(data_dir=tmp_path, arena={"watch_window": 40, "watch_alpha": 0.05, "watch_margin": 0.05})
    store = Store.open(settings.db_path)
    try:
        _tasks(store, "v1", 36, 40, 0)
        _tasks(store, "v2", 35, 40, 0)  # within noise of v1
        _tasks(store, "v3", 34, 40, 0)
        champ, parent = {"version": "v2"}, {"version": "v1"}
        calm = check_champion(store, settings, champ, parent)
        assert not calm.rollback and calm.stats["champion_tasks"] == 40
        _tasks(store, "v2", 12, 40, 100)  # a forced drop: the last 40 tasks of v2 mostly fail
        drop = check_champion(store, settings, champ, parent)
        assert drop.rollback, drop.reason
        assert drop.stats["champion_rate"] == pytest.approx(0.3) and drop.stats["p_value"] < 0.05
        # Other versions' tasks never count for v2.
        assert check_champion(store, settings, {"version": "v3"}, parent).rollback is False
    finally:
        store.close()
