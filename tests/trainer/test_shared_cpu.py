"""The trainer shares the machine: with one core held busy by another process, it trains on the CPUs left,
with threads that sleep instead of spinning, below the priority of the work it shares the machine with."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures.trainer import TrainerRun, core_held_busy, cpu_capacity

from academyd.trainer import cpu
from academyd.trainer import spec as S

pytestmark = pytest.mark.slow


def test_training_beside_a_core_held_busy(
    tmp_path: Path, make_spec: Callable[..., S.TrainSpec], run_trainer: Callable[..., TrainerRun]
) -> None:
    allowed = len(cpu.allowed_cpus())
    quota = cpu.cgroup_cpus()
    capacity = cpu_capacity()
    with core_held_busy(240):  # the hog ends before the trainer: the block fails
        # What the trainer will find, measured here too: the hog's core at least.
        assert cpu.busy_cpus(cpu.allowed_cpus(), 0.5) >= 0.8
        spec = make_spec(tmp_path / "run", backend="auto", cpu_threads=None, max_steps=30)
        run = run_trainer(spec, env={"ACADEMY_TRAINER_CALIBRATION": str(tmp_path / "no-calibration.json")},
                          timeout=280)
    assert run.returncode == S.EXIT_OK, run.stderr[-3000:]
    start = run.of_type("start")[0]
    found = start["cpu"]
    assert found["allowed"] == allowed and found["quota"] == quota and found["requested"] is None
    assert found["busy"] >= 0.8, found  # it saw the busy core
    # Its threads are the CPUs left free (never more than all but the hog's), and torch runs that many.
    assert found["threads"] == cpu.choose_threads(allowed, quota, found["busy"])[0]
    assert 1 <= found["threads"] <= max(1, capacity - 1), found
    assert found["torch_threads"] == found["threads"]
    assert found["wait_policy"] == found["omp_wait_policy"] == "PASSIVE"
    # Nice'd below the process that started it (the daemon), so Venom's runtime and the daemon come first.
    assert found["nice"] == min(19, os.getpriority(os.PRIO_PROCESS, 0) + cpu.NICE_INCREMENT)
    assert f"torch threads {found['threads']}, wait policy PASSIVE" in run.stderr
    # On the CPU, auto picked the backend measured faster here (peft, with no measurement of this machine).
    assert start["backend"] == "peft" and "backend=auto on the CPU" in start["backend_note"]
    done = run.of_type("done")[0]["summary"]
    assert done["steps"] == 30 and done["cpu"] == found
    assert done["final_loss"] < done["first_loss"]
