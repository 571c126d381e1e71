"""The trainer on a shared machine, pure parts: CPUs allowed and free, the cgroup quota, the thread count,
the wait policy's environment, and which backend `auto` picks on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from academyd.trainer import cpu
from academyd.trainer.backend import auto_cpu_backend


@pytest.mark.parametrize(("text", "cpus"), [
    ("max 100000\n", None),
    ("150000 100000\n", 1.5),
    ("50000 100000", 0.5),
    ("200000", 2.0),  # the period defaults to 100 ms
])
def test_cgroup_v2_cpu_max(text: str, cpus: float | None) -> None:
    assert cpu.parse_cpu_max(text) == cpus


@pytest.mark.parametrize(("quota", "period", "cpus"), [("-1", "100000", None), ("100000", "100000", 1.0),
                                                       ("250000\n", "100000\n", 2.5)])
def test_cgroup_v1_cfs(quota: str, period: str, cpus: float | None) -> None:
    assert cpu.parse_cfs(quota, period) == cpus


def test_cgroup_quota_found_for_this_process_cgroup(tmp_path: Path) -> None:
    # v2: the process's own cgroup (from /proc/self/cgroup) holds the quota; the root has none.
    (tmp_path / "system.slice" / "venom.service").mkdir(parents=True)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "system.slice" / "venom.service" / "cpu.max").write_text("150000 100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/system.slice/venom.service\n")
    assert cpu.cgroup_cpus(tmp_path, proc) == 1.5
    # v1 (this VM's layout): cpu controller directory, quota -1 means none.
    v1 = tmp_path / "v1"
    (v1 / "cpu" / "docker" / "abc").mkdir(parents=True)
    for d, quota in ((v1 / "cpu", "-1"), (v1 / "cpu" / "docker" / "abc", "100000")):
        (d / "cpu.cfs_quota_us").write_text(quota + "\n")
        (d / "cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("4:memory:/x\n2:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cpu.cgroup_cpus(v1, proc) == 1.0
    proc.write_text("2:cpu,cpuacct:/\n")
    assert cpu.cgroup_cpus(v1, proc) is None
    assert cpu.cgroup_cpus(tmp_path / "absent", tmp_path / "absent-cgroup") is None


STAT_0 = """cpu  300 0 100 700 0 0 0 0 0 0
cpu0 100 0 0 100 0 0 0 0 0 0
cpu1 100 0 50 50 0 0 0 0 0 0
cpu2 100 0 50 550 0 0 0 0 0 0
intr 1 2 3
"""
# 100 ticks later: cpu0 all busy, cpu1 all idle (50 iowait counts as idle), cpu2 a quarter busy.
STAT_1 = """cpu  0 0 0 0 0 0 0 0 0 0
cpu0 180 0 20 100 0 0 0 0 0 0
cpu1 100 0 50 100 50 0 0 0 0 0
cpu2 120 0 55 625 0 0 0 0 0 0
"""


def test_busy_cpus_from_two_stat_samples(tmp_path: Path) -> None:
    assert cpu.read_stat(STAT_0, {0, 1}) == {0: (100, 200), 1: (150, 200)}
    before, after = cpu.read_stat(STAT_0, {0, 1, 2}), cpu.read_stat(STAT_1, {0, 1, 2})
    assert cpu.busy_between(before, after) == pytest.approx(1.0 + 0.0 + 0.25)
    # Only the CPUs the process may use count: work pinned elsewhere is not in its way.
    assert cpu.busy_between(cpu.read_stat(STAT_0, {1, 2}), cpu.read_stat(STAT_1, {1, 2})) == pytest.approx(0.25)
    stat = tmp_path / "stat"
    samples = iter([STAT_0, STAT_1])

    def sleep(_: float) -> None:
        stat.write_text(next(samples))

    sleep(0)
    assert cpu.busy_cpus({0, 1, 2}, 0.5, stat=stat, sleep=sleep) == pytest.approx(1.25)
    assert cpu.busy_cpus({0}, stat=tmp_path / "no-stat") == 0.0


@pytest.mark.parametrize(("allowed", "quota", "busy", "threads"), [
    (2, None, 0.0, 2),     # an idle 2-core VM: both
    (2, None, 1.0, 1),     # one core held busy: the other one
    (2, None, 0.3, 2),     # background noise does not cost a core
    (2, None, 0.6, 1),
    (2, None, 2.0, 1),     # everything busy: still one thread, never zero
    (16, 2.0, 0.0, 2),     # a container's quota caps the host's CPUs
    (16, 0.5, 0.0, 1),     # a fractional quota is one thread
    (16, 4.5, 1.0, 3),
    (4, None, 1.2, 3),
    (1, None, 0.0, 1),
])
def test_threads_are_the_cpus_left_free(allowed: int, quota: float | None, busy: float, threads: int) -> None:
    got, why = cpu.choose_threads(allowed, quota, busy)
    assert got == threads
    assert f"{allowed} CPUs allowed" in why and f"{busy:.2f} busy" in why


def test_plan_honours_an_explicit_thread_count_and_sets_a_passive_wait() -> None:
    plan = cpu.measure(3, sample_s=0.05)
    assert plan.threads == 3 and plan.requested == 3 and "cpu_threads 3 set in the spec" in plan.reason
    assert plan.allowed == len(cpu.allowed_cpus()) and plan.wait_policy == "PASSIVE"
    env: dict[str, str] = {"OMP_WAIT_POLICY": "ACTIVE"}
    cpu.apply_env(plan, env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0", "OMP_NUM_THREADS": "3",
                   "MKL_NUM_THREADS": "3"}


MACHINE = "Intel Xeon x2 | torch 2.13.0 peft 0.21.2 unsloth 2026.1"


@pytest.mark.parametrize(("calibration", "backend", "said"), [
    (None, "peft", "no measurement for this machine"),
    ({"machine": "AMD EPYC x64 | ...", "tokens_per_s": {"unsloth": 900, "peft": 100}}, "peft", "another machine"),
    ({"machine": MACHINE, "tokens_per_s": {"unsloth": 121.0, "peft": 142.0}}, "peft", "unsloth 121 vs peft 142"),
    ({"machine": MACHINE, "tokens_per_s": {"unsloth": 300.0, "peft": 142.0}}, "unsloth", "measured faster"),
    ({"machine": MACHINE, "tokens_per_s": {"unsloth": 300.0}}, "peft", "incomplete"),
])
def test_auto_on_the_cpu_picks_the_backend_measured_faster(calibration: dict | None, backend: str, said: str) -> None:
    got, why = auto_cpu_backend(calibration, MACHINE)
    assert got == backend and said in why
