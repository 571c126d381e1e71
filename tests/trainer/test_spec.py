"""Pure logic of the trainer spec: validation, hashing, hyperparameter planning, step counting."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from academyd.trainer.spec import (
    GIB,
    Hyperparameters,
    SpecError,
    TrainSpec,
    plan_hyperparameters,
    spec_hash,
    total_steps,
)

BASE = {"base_model": "/models/base", "dataset_path": "/d/train.jsonl", "output_dir": "/runs/a"}
DEFAULT = Hyperparameters()


def spec(**changes: object) -> TrainSpec:
    return TrainSpec.from_dict({**BASE, **changes})


def test_defaults_are_venoms() -> None:
    hp = TrainSpec.from_dict(BASE).hyperparameters
    assert (hp.lora_r, hp.lora_alpha, hp.lora_dropout) == (16, 32, 0.05)
    assert hp.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert (hp.learning_rate, hp.epochs, hp.batch_size, hp.max_length) == (2e-4, 3.0, 4, 2048)


def test_round_trip() -> None:
    s = spec(heldout_path="/d/h.jsonl", format="sharegpt", seed=7, backend="peft", max_steps=9,
             hyperparameters={"lora_r": 8, "target_modules": ["q_proj"]}, cpu_threads=1, run_id="r1")
    assert TrainSpec.from_dict(s.to_dict()) == s


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"base_model": ""}, "base_model is required"),
        ({"dataset_path": None}, "dataset_path is required"),
        ({"format": "csv"}, "format must be one of"),
        ({"backend": "tpu"}, "backend must be one of"),
        ({"max_steps": 0}, "max_steps must be a positive integer"),
        ({"seed": "x"}, "seed must be an integer"),
        ({"colour": "red"}, "unknown field 'colour'"),
        ({"hyperparameters": {"lora_r": 0}}, "lora_r must be >= 1"),
        ({"hyperparameters": {"learning_rate": "fast"}}, "learning_rate must be a finite number"),
        ({"hyperparameters": {"batch": 4}}, "unknown hyperparameter 'batch'"),
        ({"hyperparameters": {"target_modules": []}}, "target_modules must be a non-empty list"),
        ({"hyperparameters": {"adjust": 1}}, "adjust must be true or false"),
        ({"cpu_threads": 0}, "cpu_threads must be a positive integer"),
        # The trainer runs in its own directory: relative paths are refused, not guessed at.
        ({"dataset_path": "data/training/train.jsonl"}, "dataset_path must be an absolute path"),
        ({"heldout_path": "heldout.jsonl"}, "heldout_path must be an absolute path"),
        ({"output_dir": "data/runs/r1"}, "output_dir must be an absolute path"),
        ({"base_model": "./models/base"}, "base_model must be an absolute path or a hub name"),
    ],
)
def test_invalid_specs_name_the_field(changes: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        TrainSpec.from_dict({**BASE, **changes})


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SpecError) as err:
        TrainSpec.from_dict({"format": "csv", "hyperparameters": {"epochs": 0}})
    text = str(err.value)
    for field in ("base_model", "dataset_path", "output_dir", "format", "epochs"):
        assert field in text


def test_hash_is_stable_and_canonical() -> None:
    a = spec(hyperparameters={"lora_r": 8, "learning_rate": 1e-3})
    b = TrainSpec.from_dict({"hyperparameters": {"learning_rate": 1e-3, "lora_r": 8}, **BASE})
    assert spec_hash(a) == spec_hash(b)
    assert len(spec_hash(a)) == 64
    # Pinned: the hash is stored with results, so changing how it is computed must be deliberate.
    assert spec_hash(TrainSpec.from_dict(BASE)) == spec_hash(TrainSpec.from_dict({**BASE, "seed": 3407}))


@pytest.mark.parametrize(
    ("changes", "same"),
    [
        ({"output_dir": "/elsewhere"}, True),
        ({"run_id": "run-42"}, True),
        ({"cpu_threads": 1}, True),
        ({"seed": 1}, False),
        ({"backend": "peft"}, False),
        ({"max_steps": 10}, False),
        ({"base_model": "/models/other"}, False),
        ({"hyperparameters": {"learning_rate": 1e-3}}, False),
        ({"hyperparameters": {"save_steps": 10}}, False),
    ],
)
def test_hash_covers_what_is_trained_not_where(changes: dict[str, object], same: bool) -> None:
    assert (spec_hash(spec(**changes)) == spec_hash(spec())) is same


def test_spec_module_is_stdlib_only() -> None:
    # The daemon imports academyd.trainer.spec; it must not pull torch (or pydantic: the trainer lacks it).
    code = (
        "import sys, academyd.trainer.spec as s; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch','transformers','pydantic','numpy')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


HP4 = Hyperparameters(batch_size=4, grad_accumulation=1)


@pytest.mark.parametrize(
    ("hp", "n", "memory_gib", "device", "batch", "accum", "epochs", "max_length", "notes"),
    [
        # plenty of memory, mid-size data: unchanged
        (HP4, 1000, 80, "cuda", 4, 1, 3.0, 2048, 0),
        (HP4, 1000, None, "cpu", 4, 1, 3.0, 2048, 0),
        # under 8 GB: batch 1, the effective batch kept by accumulation
        (HP4, 1000, 6, "cuda", 1, 4, 3.0, 2048, 1),
        (Hyperparameters(batch_size=4, grad_accumulation=2), 1000, 7.9, "cuda", 1, 8, 3.0, 2048, 1),
        (HP4, 1000, 8, "cuda", 4, 1, 3.0, 2048, 0),
        # under 4 GB: also a shorter max_length
        (HP4, 1000, 3, "cuda", 1, 4, 3.0, 1024, 2),
        # little RAM on the CPU counts the same way
        (HP4, 1000, 2, "cpu", 1, 4, 3.0, 1024, 2),
        # batch 1 already: nothing to shrink
        (Hyperparameters(batch_size=1), 1000, 6, "cuda", 1, 1, 3.0, 2048, 0),
        # tiny dataset: the effective batch never exceeds it
        (HP4, 3, 80, "cuda", 3, 1, 3.0, 2048, 1),
        (Hyperparameters(batch_size=2, grad_accumulation=8), 5, 80, "cuda", 2, 2, 3.0, 2048, 1),
        (HP4, 1, 80, "cuda", 1, 1, 3.0, 2048, 1),
        # large datasets: fewer epochs
        (HP4, 5000, 80, "cuda", 4, 1, 3.0, 2048, 0),
        (HP4, 5001, 80, "cuda", 4, 1, 2.0, 2048, 1),
        (HP4, 20001, 80, "cuda", 4, 1, 1.0, 2048, 1),
        (Hyperparameters(epochs=0.5), 50000, 80, "cuda", 4, 1, 0.5, 2048, 0),
        # adjust=false: as given, whatever the machine
        (Hyperparameters(adjust=False), 2, 1, "cuda", 4, 1, 3.0, 2048, 1),
    ],
)
def test_plan_hyperparameters(
    hp: Hyperparameters, n: int, memory_gib: float | None, device: str,
    batch: int, accum: int, epochs: float, max_length: int, notes: int,
) -> None:
    memory = None if memory_gib is None else int(memory_gib * GIB)
    plan = plan_hyperparameters(hp, n_examples=n, memory_bytes=memory, device=device)
    got = plan.hyperparameters
    assert (got.batch_size, got.grad_accumulation, got.epochs, got.max_length) == (batch, accum, epochs, max_length)
    assert len(plan.notes) == notes, plan.notes
    # Only the planned fields change.
    untouched = {"batch_size", "grad_accumulation", "epochs", "max_length"}
    for f in dataclasses.fields(Hyperparameters):
        if f.name not in untouched:
            assert getattr(got, f.name) == getattr(hp, f.name)


def test_plan_is_pure() -> None:
    args = {"n_examples": 700, "memory_bytes": 6 * GIB, "device": "cuda"}
    assert plan_hyperparameters(DEFAULT, **args) == plan_hyperparameters(DEFAULT, **args)


def test_plan_refuses_an_empty_dataset() -> None:
    with pytest.raises(ValueError, match="empty dataset"):
        plan_hyperparameters(DEFAULT, n_examples=0, memory_bytes=None, device="cpu")


@pytest.mark.parametrize(
    ("n", "batch", "accum", "epochs", "max_steps", "expected"),
    [
        (200, 8, 1, 3.0, None, 75),
        (201, 8, 1, 3.0, None, 78),
        (200, 8, 2, 3.0, None, 39),
        (200, 8, 1, 0.5, None, 13),
        (3, 8, 1, 2.0, None, 2),
        (200, 8, 1, 3.0, 10, 10),
    ],
)
def test_total_steps(n: int, batch: int, accum: int, epochs: float, max_steps: int | None, expected: int) -> None:
    hp = Hyperparameters(batch_size=batch, grad_accumulation=accum, epochs=epochs)
    assert total_steps(n, hp, max_steps) == expected
