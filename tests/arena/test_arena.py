"""The arena end to end: real training, the measurement in the trainer's environment, the gate."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fixtures.arena import outbox_rows
from fixtures.trainer import Dataset, core_held_busy, cpu_capacity

from academyd.arena import ArenaError, evaluate
from academyd.champion.moves import promote
from academyd.registry import Registry
from academyd.settings import Settings
from academyd.store import Store
from academyd.trainer import cpu
from schemas.models import EvaluationFinished

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


async def test_a_noise_candidate_is_rejected_and_the_champion_stays(
    arena_settings: Settings, arena_store: Store, trained_good: Path, trained_noise: Path, tiny_base_model: Path,
    alpaca_data: Dataset, tmp_path: Path,
) -> None:
    s = arena_settings
    s.arena.gguf = False
    reg = Registry(arena_store, s)
    base = str(tiny_base_model)

    # A candidate that learnt the task beats the base model and becomes the champion.
    good = reg.add_candidate(run_id="run-good", adapter_src=trained_good / "adapter", dataset=None, base_model=base,
                             run_summary=json.loads((trained_good / "summary.json").read_text()), now=NOW)
    v1 = await evaluate(s, candidate_adapter=Path(good["adapter_path"]), champion_adapter=None, base_model=base,
                        heldout_path=alpaca_data.heldout, format="alpaca", out_dir=tmp_path / "e1")
    assert v1.promote, v1.reasons
    assert v1.metrics["heldout"]["ci_low"] > 0
    assert v1.metrics["heldout"]["candidate_perplexity"] < v1.metrics["heldout"]["champion_perplexity"]
    assert v1.metrics["generation"]["n"] == 8
    assert v1.metrics["generation"]["candidate_chrf"] > v1.metrics["generation"]["champion_chrf"]
    assert v1.metrics["forgetting"]["examples"] == 36
    # Beside the general-set loss: the candidate's KL to the base there, as its training measured it.
    trained_kl = json.loads((trained_good / "summary.json").read_text())["general_kl"]
    assert v1.metrics["forgetting"]["candidate_kl"] == pytest.approx(trained_kl) and trained_kl > 0
    assert f"KL to the base {trained_kl:.4f}" in next(r for r in v1.reasons if r.startswith("general-set loss"))
    assert (tmp_path / "e1" / "measure.json").is_file() and (tmp_path / "e1" / "verdict.json").is_file()
    # It shares the machine as the trainer does: the threads asked for, waits that sleep, nice'd below the daemon.
    plan = json.loads((tmp_path / "e1" / "measure.json").read_text())["cpu"]
    assert plan["threads"] == plan["requested"] == 1 and plan["wait_policy"] == "PASSIVE", plan
    assert plan["nice"] == min(19, os.getpriority(os.PRIO_PROCESS, 0) + cpu.NICE_INCREMENT), plan
    reg.record_verdict("v1", v1, NOW)
    await promote(arena_store, s, "v1", reason="; ".join(v1.reasons), now=NOW)

    # A candidate trained on shuffled targets, against that champion: rejected on the held-out loss.
    noise = reg.add_candidate(run_id="run-noise", adapter_src=trained_noise / "adapter", dataset=None, base_model=base,
                              run_summary=json.loads((trained_noise / "summary.json").read_text()), now=NOW)
    assert noise["parent"] == "v1"
    # Measured with no thread count set, beside a core held busy by another process: it takes the CPUs left.
    s.arena.cpu_threads = None
    with core_held_busy(240):  # the hog ends before the measurement: the block fails
        v2 = await evaluate(s, candidate_adapter=Path(noise["adapter_path"]),
                            champion_adapter=Path(good["adapter_path"]), base_model=base,
                            heldout_path=alpaca_data.heldout, format="alpaca", out_dir=tmp_path / "e2")
    plan = json.loads((tmp_path / "e2" / "measure.json").read_text())["cpu"]
    allowed, quota, capacity = len(cpu.allowed_cpus()), cpu.cgroup_cpus(), cpu_capacity()
    assert plan["requested"] is None and plan["busy"] >= 0.8 and plan["wait_policy"] == "PASSIVE", plan
    assert plan["threads"] == cpu.choose_threads(allowed, quota, plan["busy"])[0], plan
    assert 1 <= plan["threads"] <= max(1, capacity - 1), plan
    assert not v2.promote
    assert v2.champion == "v1"  # named from the registry path models/v1/adapter
    assert v2.rules["heldout"] is False and v2.metrics["heldout"]["ci_high"] < 0, v2.reasons
    assert "does not lie above zero" in v2.reasons[0] and "(v1)" in v2.reasons[0]
    reg.record_verdict("v2", v2, NOW)

    assert reg.champion()["version"] == "v1"
    assert reg.get("v2")["status"] == "rejected"
    events = [EvaluationFinished.model_validate(r["payload"]) for r in outbox_rows(arena_store,
                                                                                 "academy.evaluation.finished")]
    assert [(e.version, e.verdict, e.champion) for e in events] == [("v1", "promote", None), ("v2", "reject", "v1")]
    assert events[0].metrics["forgetting"]["candidate_kl"] == pytest.approx(trained_kl)  # the verdict event carries it
    assert json.loads(s.active_adapter_path.read_text())["version"] == "v1"


async def test_measurement_errors_are_clear(arena_settings: Settings, trained_good: Path, tiny_base_model: Path,
                                            tmp_path: Path) -> None:
    with pytest.raises(ArenaError, match="held-out set .* does not exist"):
        await evaluate(arena_settings, candidate_adapter=trained_good / "adapter", champion_adapter=None,
                       base_model=str(tiny_base_model), heldout_path=tmp_path / "missing.jsonl", format="alpaca",
                       out_dir=tmp_path / "e")
    arena_settings.training.trainer_python = tmp_path / "no-python"
    with pytest.raises(ArenaError, match="make trainer-env"):
        await evaluate(arena_settings, candidate_adapter=trained_good / "adapter", champion_adapter=None,
                       base_model=str(tiny_base_model), heldout_path=tmp_path / "h.jsonl", format="alpaca",
                       out_dir=tmp_path / "e")
