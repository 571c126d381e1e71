"""Run states: every (from, to) pair against the written rule, applied to a real SQLite store."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest

from academyd.runs import ACTIVE, ALLOWED, IllegalTransition, RunState, allowed
from academyd.store import Store

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
FORWARD = [RunState.REQUESTED, RunState.CURATING, RunState.TRAINING, RunState.EVALUATING, RunState.SUCCEEDED]


def expected(a: RunState, b: RunState) -> bool:
    if a not in ACTIVE:
        return False  # terminal states are final
    if b in (RunState.FAILED, RunState.REFUSED):
        return True
    if a == b:
        return a != RunState.REQUESTED  # re-entry after a restart; nothing goes back to requested
    return FORWARD.index(b) == FORWARD.index(a) + 1 if b in FORWARD else False


@pytest.mark.parametrize(("a", "b"), list(itertools.product(RunState, RunState)))
def test_every_pair_follows_the_rule(a: RunState, b: RunState, tmp_path) -> None:
    assert allowed(a, b) is expected(a, b)
    assert (b in ALLOWED[a]) is expected(a, b)
    # The store applies the same rule: a refused move changes nothing.
    store = Store.open(tmp_path / "academy.db")
    run_id = store.create_run(reason="t", forced=False, new_lessons=0, now=NOW)
    with store.transaction():
        store.set_run_state(run_id, a, NOW)  # put it there directly (a fixture, not a move)
    if expected(a, b):
        with store.transaction():
            assert store.move_run(run_id, b, NOW, expected=a) == a
        assert store.get_run(run_id)["state"] == b
    else:
        with pytest.raises(IllegalTransition), store.transaction():
            store.move_run(run_id, b, NOW)
        assert store.get_run(run_id)["state"] == a
    store.close()


def test_a_move_decided_on_a_stale_state_is_refused(tmp_path) -> None:
    store = Store.open(tmp_path / "academy.db")
    run_id = store.create_run(reason="t", forced=False, new_lessons=0, now=NOW)
    with store.transaction():
        store.move_run(run_id, "curating", NOW, expected="requested")
    with pytest.raises(IllegalTransition, match="is curating, not requested"), store.transaction():
        store.move_run(run_id, "curating", NOW, expected="requested")
    store.close()
