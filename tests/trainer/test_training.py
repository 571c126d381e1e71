"""Real training runs on the tiny model: Unsloth's CPU backend through the process habitat, the peft
fallback, kill -9 and resume, and bad inputs that fail before torch loads."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fixtures.trainer import REPO, Dataset, TrainerRun, evaluate_adapter, parse_events, run_until_killed, trainer_env

from academyd.habitat.base import JobStatus, TrainingJob
from academyd.habitat.process import ProcessHabitat
from academyd.trainer import spec as S

pytestmark = pytest.mark.slow

# The trainer's backend (Unsloth's CPU kernels or peft) and a plain transformers + peft reload run different
# kernels, whose float results differ by CPU: measured 4e-4 relative on a held-out loss on an AMD EPYC
# (1.574275 vs 1.573647), under 1e-5 on the Intel Xeon of these machines. 5e-3 is ten times the worst seen
# and still a hundred times smaller than the gap between the adapter and the base (the adapter halves the loss).
KERNEL_REL_TOL = 5e-3


def assert_learned(summary: dict[str, Any], loss_lines: list[dict[str, Any]]) -> None:
    """The loss fell clearly and the adapter beats the base model on held-out data."""
    losses = [line["loss"] for line in loss_lines]
    assert len(losses) >= 5
    assert losses[-1] < 0.4 * losses[0], losses
    assert summary["final_loss"] == pytest.approx(losses[-1])
    assert summary["adapter_heldout_loss"] < 0.5 * summary["base_heldout_loss"], summary
    assert math.isfinite(summary["tokens_per_s"]) and summary["tokens_per_s"] > 0
    assert summary["peak_rss_mb"] > 0


def assert_adapter_reloads(trainer_python: Path, base: Path, out: Path, data: Dataset, summary: dict[str, Any]) -> None:
    """A fresh process (plain transformers + peft) reloading the adapter computes what the trainer's model did."""
    adapter = out / S.ADAPTER_DIR
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (adapter / name).is_file(), name
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base)
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 32
    assert not [p.name for p in out.iterdir() if p.name.startswith(".adapter")]
    reloaded = evaluate_adapter(trainer_python, base, adapter, data.heldout)
    assert reloaded["loss"] == pytest.approx(summary["adapter_heldout_loss"], rel=KERNEL_REL_TOL)
    assert reloaded["probe"]["top_ids"][:3] == summary["probe"]["top_ids"][:3]
    assert reloaded["probe"]["top_logits"] == pytest.approx(summary["probe"]["top_logits"], rel=KERNEL_REL_TOL, abs=1e-2)
    base_only = reloaded["base_result"]
    assert base_only["loss"] == pytest.approx(summary["base_heldout_loss"], rel=KERNEL_REL_TOL)
    # The base alone answers differently from the adapter, by far more than the kernels' tolerance.
    gap = max(abs(a - b) for a, b in zip(base_only["probe"]["top_logits"], summary["probe"]["top_logits"], strict=True))
    assert gap > 0.1, gap


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def test_unsloth_cpu_run_in_process_habitat(
    tmp_path: Path, make_spec: Callable[..., S.TrainSpec], trainer_python: Path, tiny_base_model: Path,
    alpaca_data: Dataset,
) -> None:
    spec = make_spec(tmp_path / "run", backend="unsloth", run_id="r-unsloth", hyperparameters={"eval_steps": 25})
    habitat = ProcessHabitat(trainer_python, poll_s=0.1)
    handle = await habitat.start(TrainingJob(spec=spec, run_id="r-unsloth", time_limit_s=600))
    assert await habitat.status(handle) is JobStatus.RUNNING
    events = [e async for e in habitat.progress(handle)]
    result = await habitat.result(handle)
    await habitat.close()

    assert result.status is JobStatus.SUCCEEDED, (result, (tmp_path / "run" / "trainer.stderr").read_text()[-3000:])
    assert result.exit_code == S.EXIT_OK and result.reason is None
    types = [e["type"] for e in events]
    assert types[0] == "start" and types[-1] == "done" and "checkpoint" in types
    start = events[0]
    assert start["backend"] == "unsloth" and start["device"].startswith("cpu")
    assert start["versions"]["unsloth"] and start["versions"]["torch"].startswith("2.13.0")
    assert start["spec_hash"] == S.spec_hash(spec) and start["resumed_from"] is None
    progress = [e for e in events if e["type"] == "progress"]
    assert progress[-1]["step"] == start["total_steps"] == 75
    for key in ("step", "total_steps", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s"):
        assert key in progress[0], key
    evals = [e for e in progress if "eval_loss" in e]
    assert [e["step"] for e in evals] == [25, 50, 75] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    # The stream the habitat gives is the trainer's events.jsonl, and stdout carried only protocol lines.
    assert read_jsonl(tmp_path / "run" / S.EVENTS_FILE) == events
    assert parse_events((tmp_path / "run" / "trainer.stdout").read_text()) == events

    summary = result.summary
    assert summary is not None and summary == events[-1]["summary"]
    assert summary["backend"] == "unsloth" and summary["spec_hash"] == S.spec_hash(spec)
    assert summary["spec"] == json.loads((tmp_path / "run" / S.SPEC_FILE).read_text())
    assert summary["steps"] == 75
    assert result.adapter_path == str(tmp_path / "run" / S.ADAPTER_DIR)
    assert not (tmp_path / "run" / S.CHECKPOINTS_DIR).exists()
    assert_learned(summary, read_jsonl(tmp_path / "run" / S.LOSS_FILE))
    assert_adapter_reloads(trainer_python, tiny_base_model, tmp_path / "run", alpaca_data, summary)

    # The same spec again: already trained, nothing redone.
    again = await habitat.start(TrainingJob(spec=spec, run_id="r-unsloth"))
    replay = [e async for e in habitat.progress(again)]
    assert [e["type"] for e in replay] == ["done"] and replay[0]["already_done"] is True
    await habitat.close()


def test_peft_fallback_when_unsloth_cannot_import(
    tmp_path: Path, make_spec: Callable[..., S.TrainSpec], run_trainer: Callable[..., TrainerRun],
    trainer_python: Path, tiny_base_model: Path, alpaca_data: Dataset,
) -> None:
    # What a machine without a working Unsloth looks like: `import unsloth` raises.
    shadow = tmp_path / "no-unsloth" / "unsloth"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('Unsloth: no supported accelerator (test shadow)')\n")
    # On the CPU `auto` tries Unsloth only where it was measured faster: say so for this machine.
    key = subprocess.run([str(trainer_python), "-c", "from academyd.trainer.backend import machine_key; "
                          "print(machine_key())"], env=trainer_env(), capture_output=True, text=True, check=True)
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"machine": key.stdout.strip(), "tokens_per_s": {"unsloth": 300, "peft": 100}}))
    spec = make_spec(tmp_path / "run", backend="auto")
    run = run_trainer(spec, env={"PYTHONPATH": f"{shadow.parent}{os.pathsep}{REPO}",
                                 "ACADEMY_TRAINER_CALIBRATION": str(calibration)})
    assert run.returncode == S.EXIT_OK, run.stderr[-3000:]
    start = run.of_type("start")[0]
    assert start["backend"] == "peft"
    assert "unsloth 300 vs peft 100" in start["backend_note"]
    assert "unsloth unavailable" in start["backend_note"] and "test shadow" in start["backend_note"]
    summary = json.loads((tmp_path / "run" / S.SUMMARY_FILE).read_text())
    assert summary["backend"] == "peft" and summary["backend_note"] == start["backend_note"]
    assert_learned(summary, read_jsonl(tmp_path / "run" / S.LOSS_FILE))
    assert_adapter_reloads(trainer_python, tiny_base_model, tmp_path / "run", alpaca_data, summary)


def test_killed_mid_run_resumes_from_checkpoint(
    tmp_path: Path, make_spec: Callable[..., S.TrainSpec], run_trainer: Callable[..., TrainerRun],
    trainer_python: Path,
) -> None:
    out = tmp_path / "run"
    spec = make_spec(out, backend="peft", hyperparameters={"epochs": 2, "save_steps": 10, "logging_steps": 1})
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec.to_dict()))
    first, status = run_until_killed(trainer_python, spec_path,
                                     lambda e: e["type"] == "checkpoint" and e["step"] >= 20)
    assert status == -signal.SIGKILL, first
    assert not (out / S.ADAPTER_DIR).exists() and not (out / S.SUMMARY_FILE).exists()
    total = first[0]["total_steps"]
    assert total == 50

    run = run_trainer(spec_path)
    assert run.returncode == S.EXIT_OK, run.stderr[-3000:]
    start = run.of_type("start")[0]
    assert start["resumed_from"] is not None and start["resumed_from"] >= 20
    steps = [e["step"] for e in run.of_type("progress")]
    assert steps[0] == start["resumed_from"] + 1 and steps[-1] == total
    summary = json.loads((out / S.SUMMARY_FILE).read_text())
    assert summary["resumed_from"] == start["resumed_from"] and summary["steps"] == total
    logged = [line["step"] for line in read_jsonl(out / S.LOSS_FILE)]
    assert logged == list(range(1, total + 1))  # no gap, no duplicate across the kill
    assert summary["adapter_heldout_loss"] < 0.5 * summary["base_heldout_loss"]


def _bad_input_cases(tmp: Path, base: Path, data: Dataset) -> dict[str, tuple[dict[str, Any], str]]:
    empty = tmp / "empty.jsonl"
    empty.write_text("\n")
    broken = tmp / "broken.jsonl"
    broken.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n" + '{"instruction": "no output"}\n')
    not_a_model = tmp / "not-a-model"
    not_a_model.mkdir()
    return {
        "missing dataset": ({"dataset_path": str(tmp / "nope.jsonl")}, "does not exist"),
        "empty dataset": ({"dataset_path": str(empty)}, "has no examples"),
        "bad line": ({"dataset_path": str(broken)}, "line 2"),
        "missing held-out set": ({"heldout_path": str(tmp / "nope-heldout.jsonl")}, "held-out set"),
        "unknown base model path": ({"base_model": str(tmp / "no-such-model")}, "base model path"),
        "directory without config": ({"base_model": str(not_a_model)}, "no config.json"),
        "uncached hub name": ({"base_model": "nobody/no-such-model"}, "not in the Hugging Face cache"),
        "bad spec": ({"hyperparameters": {"lora_r": -1}}, "lora_r must be >= 1"),
    }


def test_bad_inputs_fail_fast_before_torch(
    tmp_path: Path, tiny_base_model: Path, alpaca_data: Dataset, run_trainer: Callable[..., TrainerRun],
) -> None:
    cases = _bad_input_cases(tmp_path, tiny_base_model, alpaca_data)
    for name, (changes, message) in cases.items():
        out = tmp_path / name.replace(" ", "-")
        data = {
            "base_model": str(tiny_base_model), "dataset_path": str(alpaca_data.train),
            "heldout_path": str(alpaca_data.heldout), "output_dir": str(out), **changes,
        }
        spec_path = tmp_path / f"{out.name}.json"
        spec_path.write_text(json.dumps(data))
        # -X importtime lists every module imported: proof that torch was never loaded.
        run = run_trainer(spec_path, python_args=("-X", "importtime"), timeout=120)
        assert run.returncode == S.EXIT_BAD_INPUT, (name, run.events, run.stderr[-2000:])
        assert [e["type"] for e in run.events] == ["error"], name
        error = run.events[0]
        assert error["code"] == "bad_input" and error["exit_code"] == S.EXIT_BAD_INPUT
        assert message in error["reason"], (name, error["reason"])
        imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if "import time:" in line}
        assert "academyd.trainer.train" in imported, name  # the import list was really read
        assert "torch" not in imported and "transformers" not in imported, name
        assert not (out / S.ADAPTER_DIR).exists(), name
        assert not (out / S.SUMMARY_FILE).exists(), name


def test_unreadable_spec_file(tmp_path: Path, run_trainer: Callable[..., TrainerRun]) -> None:
    garbage = tmp_path / "spec.json"
    garbage.write_text("{not json")
    for path in (garbage, tmp_path / "missing.json"):
        run = run_trainer(path, timeout=60)
        assert run.returncode == S.EXIT_BAD_INPUT
        assert run.events[-1]["type"] == "error" and run.events[-1]["code"] == "bad_input"
        assert str(path) in run.events[-1]["reason"]


def poison_weights(model_dir: Path, out_dir: Path, tensor: str = "model.norm.weight") -> Path:
    """A copy of the model whose `tensor` is all NaN (a corrupt base model), edited in the safetensors bytes."""
    shutil.copytree(model_dir, out_dir)
    path = out_dir / "model.safetensors"
    raw = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    entry = header[tensor]
    assert entry["dtype"] == "F32"
    begin, end = (8 + header_len + o for o in entry["data_offsets"])
    raw[begin:end] = struct.pack("<f", float("nan")) * ((end - begin) // 4)
    path.write_bytes(bytes(raw))
    return out_dir


def test_nan_loss_stops_with_exit_3(
    tmp_path: Path, make_spec: Callable[..., S.TrainSpec], run_trainer: Callable[..., TrainerRun],
    tiny_base_model: Path,
) -> None:
    corrupt = poison_weights(tiny_base_model, tmp_path / "corrupt-model")
    spec = make_spec(tmp_path / "run", backend="peft", base_model=str(corrupt), max_steps=20,
                     hyperparameters={"logging_steps": 1})
    run = run_trainer(spec)
    assert run.returncode == S.EXIT_TRAINING_FAILED, (run.events[-3:], run.stderr[-2000:])
    error = run.events[-1]
    assert error["type"] == "error" and error["code"] == "loss_nan", error
    assert "step 1" in error["reason"] and "learning_rate" in error["reason"]
    assert [e["step"] for e in run.of_type("progress")] == [1]
    assert not (tmp_path / "run" / S.ADAPTER_DIR).exists()
