"""Real runs on the tiny model: MiCA with rsLoRA saved as the plain LoRA that serves at the trained scale,
and forgetting as a budget (the KL to the base on the general set, measured while training, stops a run)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixtures.trainer import Dataset, TrainerRun, evaluate_adapter

from academyd.trainer import spec as S

pytestmark = pytest.mark.slow

KERNEL_REL_TOL = 5e-3  # as tests/trainer/test_training.py


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        assert entry["dtype"] == "F32", entry
        begin, end = (8 + n + o for o in entry["data_offsets"])
        out[name] = np.frombuffer(raw[begin:end], dtype=np.float32).reshape(entry["shape"])
    return out


def test_mica_with_rslora_saves_a_plain_lora_that_reloads_to_what_was_trained(
    tmp_path: Path, make_spec: Callable[..., S.TrainSpec], run_trainer: Callable[..., TrainerRun],
    trainer_python: Path, tiny_base_model: Path, alpaca_data: Dataset,
) -> None:
    out = tmp_path / "run"
    spec = make_spec(out, backend="auto", max_steps=40,
                     hyperparameters={"adapter": "mica", "use_rslora": True, "lora_r": 16, "lora_alpha": 8})
    run = run_trainer(spec)
    assert run.returncode == S.EXIT_OK, run.stderr[-3000:]
    start = run.of_type("start")[0]
    assert start["backend"] == "peft" and start["hyperparameters"]["adapter"] == "mica"
    summary = json.loads((out / S.SUMMARY_FILE).read_text())
    assert summary["adapter_heldout_loss"] < 0.8 * summary["base_heldout_loss"], summary
    cfg = json.loads((out / S.ADAPTER_DIR / "adapter_config.json").read_text())
    # rsLoRA's alpha/sqrt(r) written as a plain LoRA's alpha/r: alpha 8 * sqrt(16) = 32.
    assert cfg["use_rslora"] is False and cfg["lora_alpha"] == pytest.approx(32.0) and cfg["r"] == 16
    assert cfg["init_lora_weights"] is True
    weights = read_safetensors(out / S.ADAPTER_DIR / "adapter_model.safetensors")
    b = [w for name, w in weights.items() if "lora_B" in name]
    assert b
    # MiCA: B is fixed to orthonormal singular vectors of the weight (only A trains); a LoRA's B is not.
    for mat in b:
        assert np.allclose(mat.T @ mat, np.eye(mat.shape[1]), atol=1e-3)
    # A plain transformers + peft reload (what the GGUF export reads) computes what the trainer measured.
    reloaded = evaluate_adapter(trainer_python, tiny_base_model, out / S.ADAPTER_DIR, alpaca_data.heldout)
    assert reloaded["loss"] == pytest.approx(summary["adapter_heldout_loss"], rel=KERNEL_REL_TOL)
    assert reloaded["probe"]["top_ids"][:3] == summary["probe"]["top_ids"][:3]


def kl_run(out: Path, make_spec: Callable[..., S.TrainSpec], run_trainer: Callable[..., TrainerRun],
           **hp: Any) -> tuple[TrainerRun, dict[str, Any]]:
    spec = make_spec(out, backend="peft", max_steps=30, hyperparameters={"kl_steps": 5, **hp})
    run = run_trainer(spec)
    assert run.returncode == S.EXIT_OK, run.stderr[-3000:]
    return run, json.loads((out / S.SUMMARY_FILE).read_text())


def test_kl_to_the_base_is_measured_while_training_and_a_budget_stops_the_run(
    tmp_path: Path, make_spec: Callable[..., S.TrainSpec], run_trainer: Callable[..., TrainerRun],
) -> None:
    free_run, free = kl_run(tmp_path / "free", make_spec, run_trainer)
    log = free["kl_log"]
    assert [e["step"] for e in log] == [5, 10, 15, 20, 25, 30]
    assert [e["general_kl"] for e in free_run.of_type("progress") if "general_kl" in e] == \
        [e["general_kl"] for e in log]
    assert all(e["general_kl"] > 0 for e in log) and free["general_kl"] == pytest.approx(log[-1]["general_kl"])
    assert free["kl_stopped"] is None and free["steps"] == 30
    # A budget between the KL at step 10 and the largest later one, with a patience of 2: the run stops at the
    # second measurement in a row past it, with the adapter of the last one inside.
    budget = (log[1]["general_kl"] + max(e["general_kl"] for e in log[2:])) / 2
    assert budget > log[1]["general_kl"] and any(e["general_kl"] > budget for e in log[2:])
    over = [e["general_kl"] > budget for e in log]
    stop = next((i for i in range(1, len(log)) if over[i - 1] and over[i]), None)
    # on this seed the KL stays past the budget: the stop comes before step 30
    assert stop is not None and stop < len(log) - 1, log
    kept = max(e["step"] for e in log[:stop] if e["general_kl"] <= budget)
    run, capped = kl_run(tmp_path / "capped", make_spec, run_trainer, kl_budget=budget, kl_patience=2)
    assert capped["kl_stopped"]["step"] == log[stop]["step"] and capped["kl_stopped"]["kept_step"] == kept
    assert capped["kl_stopped"]["kl_patience"] == 2 and capped["steps"] == log[stop]["step"] < 30
    # The adapter written is the one of the kept step: its KL is what was measured there (same seed, same run).
    kept_kl = next(e["general_kl"] for e in free["kl_log"] if e["step"] == kept)
    assert capped["general_kl"] == pytest.approx(kept_kl, rel=1e-3) and capped["general_kl"] <= budget
