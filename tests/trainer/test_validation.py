"""Forgetting as a budget, with early stopping on validation answers (#21, deliverable 2).

The adapter kept is the step with the most validation answers right (greedy replies scored as the gate scores
them) among the KL measurements inside the budget; the run stops at the first measurement past the budget.
Real runs on the tiny model: the reverse-three-words task, with validation questions the run never trains on.
"""

from __future__ import annotations

import json
import random
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fixtures.trainer import TrainerRun, reverse_words_example, run_until_killed

from academyd.trainer import spec as S
from academyd.trainer.loop import Measured, better

BASE = {"base_model": "/models/smol", "dataset_path": "/data/train.jsonl", "output_dir": "/runs/r1"}


def validation_items(n: int = 8, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ex = reverse_words_example(rng)
        out.append({"example": ex, "keys": ex["output"].split(), "family": f"fam-{len(out)}"})
    return out


def kept_by_rule(log: list[dict[str, Any]], budget: float | None) -> dict[str, Any]:
    """The test's own statement of the rule: the most right answers inside the budget, a tie to the later step,
    over the measurements up to the first one past the budget."""
    inside = []
    for e in log:
        if budget is not None and e["general_kl"] > budget:
            break
        inside.append(e)
    return max(inside, key=lambda e: (e["validation_right"], e["step"]))


def test_the_rule_keeps_the_most_right_answers_and_a_tie_goes_to_the_later_step() -> None:
    log = [Measured(10, 0.1, 1, 8), Measured(20, 0.2, 4, 8), Measured(30, 0.3, 2, 8), Measured(40, 0.35, 4, 8),
           Measured(50, 0.4, 3, 8)]
    best = None
    for m in log:
        if better(m, best):
            best = m
    assert best is not None and best.step == 40 and best.right == 4  # not the last step (50), not the first 4/8
    # Without validation questions every measurement inside the budget replaces the one before: the last.
    best = None
    for m in (Measured(10, 0.1), Measured(20, 0.2)):
        if better(m, best):
            best = m
    assert best is not None and best.step == 20


def test_a_budget_is_spent_only_after_patience_measurements_in_a_row_past_it() -> None:
    from academyd.trainer.loop import over_budget

    def stop_at(kls: list[float], budget: float, patience: int) -> int | None:
        streak = 0
        for i, kl in enumerate(kls):
            streak = over_budget(streak, kl, budget)
            if streak >= patience:
                return i
        return None

    # The shape measured on the house facts (bench/bench_recipe.py, arm kl): the KL peaks in the first steps
    # and replay brings it back down. One measurement past the budget stopped such a run at its peak.
    peak_then_down = [0.29, 0.24, 0.18, 0.16, 0.15]
    assert stop_at(peak_then_down, 0.2, 1) == 0
    assert stop_at(peak_then_down, 0.2, S.Hyperparameters().kl_patience) is None
    assert stop_at([0.1, 0.25, 0.1, 0.25, 0.26, 0.3], 0.2, 3) == 5  # a streak, not a count
    assert stop_at([0.3, 0.3, 0.3], 0.0, 1) is None  # no budget: never spent


def test_the_spec_carries_validation_questions_and_refuses_bad_ones() -> None:
    items = validation_items(3)
    spec = S.TrainSpec.from_dict({**BASE, "validation": items})
    assert [dict(v) for v in spec.validation] == items
    assert S.TrainSpec.from_dict(spec.to_dict()) == spec
    # They decide which step is kept, so they are part of what is trained; none hashes as before.
    assert S.spec_hash(spec) != S.spec_hash(S.TrainSpec.from_dict(BASE))
    assert S.spec_hash(S.TrainSpec.from_dict({**BASE, "validation": []})) == S.spec_hash(S.TrainSpec.from_dict(BASE))
    for bad, reason in (
        ([{"example": items[0]["example"], "keys": []}], r"validation\[0\].keys must be a non-empty list"),
        ([{"example": {"instruction": "x"}, "keys": ["a"]}], r"validation\[0\].example: alpaca lines need"),
        ([{"example": items[0]["example"], "keys": ["a"], "extra": 1}], r"validation\[0\] must be an object"),
        ([items[0]] * (S.MAX_VALIDATION + 1), "at most 16"),
    ):
        with pytest.raises(S.SpecError, match=reason):
            S.TrainSpec.from_dict({**BASE, "validation": bad})


def validation_spec(out: Path, make_spec: Callable[..., S.TrainSpec], **hp: Any) -> S.TrainSpec:
    return make_spec(out, backend="peft", max_steps=150, validation=validation_items(),
                     hyperparameters={"kl_steps": 10, "logging_steps": 10, "validation_max_new_tokens": 24, **hp})


def run_with_validation(out: Path, make_spec: Callable[..., S.TrainSpec], run_trainer: Callable[..., TrainerRun],
                        **hp: Any) -> tuple[TrainerRun, dict[str, Any]]:
    spec = validation_spec(out, make_spec, **hp)
    run = run_trainer(spec, timeout=900)
    assert run.returncode == S.EXIT_OK, run.stderr[-3000:]
    return run, json.loads((out / S.SUMMARY_FILE).read_text())


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_adapter_kept_is_the_best_on_validation_inside_the_budget_and_a_spent_budget_stops_the_run(
    tmp_path: Path, make_spec: Callable[..., S.TrainSpec], run_trainer: Callable[..., TrainerRun],
    trainer_python: Path,
) -> None:
    # Without a budget: every measurement asks the validation questions; the best step is kept.
    free_run, free = run_with_validation(tmp_path / "free", make_spec, run_trainer)
    log = free["kl_log"]
    assert [e["step"] for e in log] == list(range(10, 151, 10)) and free["steps"] == 150
    assert all(e["validation_total"] == 8 for e in log)
    progress = [e for e in free_run.of_type("progress") if "validation_right" in e]
    assert [(e["step"], e["validation_right"]) for e in progress] == [(e["step"], e["validation_right"]) for e in log]
    assert max(e["validation_right"] for e in log) > log[0]["validation_right"]  # it learns the task
    best = kept_by_rule(log, None)
    v = free["validation"]
    assert (v["kept_step"], v["right"], v["questions"]) == (best["step"], best["validation_right"], 8)
    # On this seed the validation answers peak before the end: the step kept is not the last one ...
    assert best["step"] < 150 and best["validation_right"] > log[-1]["validation_right"], log
    # ... and the adapter written is that step's: its KL to the base, measured again after training, is the
    # one measured at that step (the last step's differs).
    assert free["general_kl"] == pytest.approx(best["general_kl"], rel=1e-4)
    assert free["general_kl"] != pytest.approx(log[-1]["general_kl"], rel=1e-3)
    assert v["general_kl"] == pytest.approx(best["general_kl"]) and len(v["replies"]) == 8

    # A budget that the run passes halfway, with a patience of 1 (tests/trainer/test_variants_training.py
    # waits for 2): it stops at the first measurement past it, and keeps the best validation step before it,
    # which need not be the last one inside (the rule before validation).
    first = log[:5]
    assert log[5]["general_kl"] > max(e["general_kl"] for e in first), log
    budget = (max(e["general_kl"] for e in first) + log[5]["general_kl"]) / 2
    run, capped = run_with_validation(tmp_path / "capped", make_spec, run_trainer, kl_budget=budget,
                                      kl_patience=1)
    assert capped["kl_stopped"]["step"] == log[5]["step"] == capped["steps"] < 150
    expected = kept_by_rule(log, budget)
    assert capped["kl_stopped"]["kept_step"] == expected["step"] == capped["validation"]["kept_step"]
    assert capped["general_kl"] == pytest.approx(expected["general_kl"], rel=1e-4) and capped["general_kl"] <= budget
    # Same seed, same steps: the capped run measured what the free run measured, up to its stop.
    assert [e["validation_right"] for e in capped["kl_log"][:5]] == [e["validation_right"] for e in first]
    last_inside = max(e["step"] for e in first)
    assert expected["step"] != last_inside, first  # on this seed the old rule would have kept another step

    # Killed (SIGKILL) at the first checkpoint after its best step and run again: the resumed run still keeps
    # that step (its measurements and weights came back from the checkpoint), and its summary's log is the
    # whole run's, not only what came after the resume.
    out = tmp_path / "killed"
    spec_path = tmp_path / "killed.json"
    spec_path.write_text(json.dumps(validation_spec(out, make_spec, save_steps=10).to_dict()))
    events, status = run_until_killed(trainer_python, spec_path,
                                      lambda e: e["type"] == "checkpoint" and e["step"] > best["step"])
    killed_at = events[-1]["step"] if events[-1]["type"] == "checkpoint" else None
    assert status == -signal.SIGKILL and killed_at is not None
    assert not (out / S.SUMMARY_FILE).exists()
    again = run_trainer(spec_path, timeout=900)
    assert again.returncode == S.EXIT_OK, again.stderr[-3000:]
    resumed = json.loads((out / S.SUMMARY_FILE).read_text())
    assert resumed["resumed_from"] == killed_at
    rlog = resumed["kl_log"]
    assert [e["step"] for e in rlog] == [e["step"] for e in log]  # every measurement, once
    before = [e for e in rlog if e["step"] <= killed_at]
    assert before == [e for e in log if e["step"] <= killed_at]  # the killed attempt's own, from the checkpoint
    kept = kept_by_rule(rlog, None)
    assert resumed["validation"]["kept_step"] == kept["step"] and resumed["validation"]["right"] == kept[
        "validation_right"]
    assert kept["validation_right"] >= best["validation_right"]
    assert resumed["general_kl"] == pytest.approx(kept["general_kl"], rel=1e-4)


def test_validation_families_that_would_never_be_asked_are_refused_when_the_settings_load(tmp_path: Path) -> None:
    from academyd.settings import SettingsError, load_settings

    with pytest.raises((SettingsError, ValueError)) as info:
        load_settings(None, data_dir=tmp_path / "a", curator={"validation_families": 3})
    assert "kl_steps >= 1" in str(info.value)
    ok = load_settings(None, data_dir=tmp_path / "b", curator={"validation_families": 3},
                       training={"hyperparameters": {"kl_steps": 10}})
    assert ok.curator.validation_families == 3
    assert load_settings(None, data_dir=tmp_path / "c").curator.validation_families == 0  # the default: off
