"""How many CPU threads the trainer may use on a machine it shares, and how its threads wait.

Standard library only: it runs before torch is imported (the OpenMP runtime reads its environment once,
when torch loads it). Venom serves its LLM on the same machine, so a busy CPU is the normal case: two
threads fighting another process for one core run many times slower than one thread on the free core,
and OpenMP's default wait policy spins a waiting thread for a while, burning the core the other process
needs.

- `allowed_cpus()`: the CPUs this process may run on (sched_getaffinity).
- `cgroup_cpus()`: the CPU quota of this process's cgroup (v2 cpu.max, v1 cpu.cfs_quota_us /
  cpu.cfs_period_us), in CPUs; None when there is none.
- `busy_cpus(cpus, sample_s)`: how many of those CPUs other work keeps busy right now, from two samples
  of /proc/stat.
- `choose_threads(allowed, quota, busy)`: pure; the CPUs left free, at least one.
- `measure()`: all of it, as a `CpuPlan` the trainer logs.
- `WAIT_ENV`: a waiting OpenMP thread sleeps instead of spinning (GNU libgomp and Intel's runtime).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# PASSIVE: libgomp (torch's OpenMP on Linux) puts a waiting thread to sleep at once (its spin count 0);
# KMP_BLOCKTIME=0 does the same for Intel's runtime (MKL builds).
WAIT_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
# A CPU counts as free when on average it is idle; busy CPUs are rounded to the nearest whole one.
SAMPLE_S = 0.5


@dataclass(frozen=True)
class CpuPlan:
    """What the trainer found and chose; logged in its start event and summary as `cpu`."""

    allowed: int  # CPUs in the affinity set
    quota: float | None  # the cgroup's CPU quota in CPUs, None: no quota
    busy: float  # CPUs of the allowed set kept busy by other work when the trainer started
    threads: int  # torch's intra-op threads
    wait_policy: str
    requested: int | None  # the spec's cpu_threads (None: chosen from the above)
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 `cpu.max` ("max 100000" or "150000 100000") in CPUs."""
    parts = text.split()
    if len(parts) < 1 or parts[0] == "max":
        return None
    period = int(parts[1]) if len(parts) > 1 else 100_000
    return int(parts[0]) / period if period > 0 else None


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """cgroup v1 cpu.cfs_quota_us / cpu.cfs_period_us in CPUs (quota -1: none)."""
    quota, period = int(quota_text.strip()), int(period_text.strip())
    return quota / period if quota > 0 and period > 0 else None


def _cgroup_paths(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """(v2 path, v1 cpu controller path) of this process, from /proc/self/cgroup."""
    v2 = v1 = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def cgroup_cpus(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest CPU quota found for this process's cgroup, in CPUs; None when unlimited.

    Inside a container the cgroup namespace shows its own cgroup as the root, so the files at the mount's
    top are tried too."""
    v2, v1 = _cgroup_paths(proc_cgroup)
    found: list[float] = []
    for base in {root / (v2 or "").lstrip("/"), root}:
        try:
            q = parse_cpu_max((base / "cpu.max").read_text())
        except (OSError, ValueError):
            continue
        if q is not None:
            found.append(q)
    for base in {root / "cpu" / (v1 or "").lstrip("/"), root / "cpu", root / "cpu,cpuacct"}:
        try:
            q = parse_cfs((base / "cpu.cfs_quota_us").read_text(), (base / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if q is not None:
            found.append(q)
    return min(found) if found else None


def read_stat(text: str, cpus: Iterable[int]) -> dict[int, tuple[int, int]]:
    """{cpu: (busy ticks, total ticks)} from /proc/stat's per-CPU lines (idle and iowait are not busy)."""
    want = set(cpus)
    out = {}
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        cpu = int(name[3:])
        if cpu not in want:
            continue
        ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
        idle = ticks[3] + ticks[4]
        total = sum(ticks)
        out[cpu] = (total - idle, total)
    return out


def busy_between(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> float:
    """Busy CPUs (a sum of per-CPU busy fractions) between two `read_stat` samples."""
    busy = 0.0
    for cpu, (b1, t1) in after.items():
        if cpu not in before:
            continue
        b0, t0 = before[cpu]
        if t1 > t0:
            busy += min(max((b1 - b0) / (t1 - t0), 0.0), 1.0)
    return busy


def busy_cpus(cpus: Iterable[int], sample_s: float = SAMPLE_S, *, stat: Path = Path("/proc/stat"),
              sleep: Callable[[float], None] = time.sleep) -> float:
    """How many of `cpus` other work keeps busy: two /proc/stat samples `sample_s` apart. 0.0 if unreadable."""
    cpus = set(cpus)
    try:
        before = read_stat(stat.read_text(), cpus)
        sleep(sample_s)
        after = read_stat(stat.read_text(), cpus)
    except (OSError, ValueError):
        return 0.0
    return busy_between(before, after)


def choose_threads(allowed: int, quota: float | None, busy: float) -> tuple[int, str]:
    """(threads, why): the CPUs the trainer may use (affinity, capped by the quota) less those other work
    keeps busy, rounded to the nearest whole CPU; at least 1."""
    capacity = max(1, allowed if quota is None else min(allowed, math.floor(quota) or 1))
    free = capacity - busy
    threads = max(1, min(capacity, math.floor(free + 0.5)))
    quota_txt = "no cgroup quota" if quota is None else f"cgroup quota {quota:g} CPUs"
    return threads, (f"{allowed} CPUs allowed, {quota_txt}, {busy:.2f} busy with other work: "
                     f"{threads} thread{'s' if threads != 1 else ''}")


def measure(requested: int | None = None, *, sample_s: float = SAMPLE_S) -> CpuPlan:
    """The plan for this process now. An explicit `requested` count wins (still logged with what was found)."""
    cpus = allowed_cpus()
    quota = cgroup_cpus()
    busy = busy_cpus(cpus, sample_s)
    threads, why = choose_threads(len(cpus), quota, busy)
    if requested is not None:
        threads, why = requested, f"cpu_threads {requested} set in the spec ({why} otherwise)"
    return CpuPlan(allowed=len(cpus), quota=quota, busy=round(busy, 3), threads=threads,
                   wait_policy=WAIT_ENV["OMP_WAIT_POLICY"], requested=requested, reason=why)


def apply_env(plan: CpuPlan, environ: dict[str, str] | Any = os.environ) -> None:
    """Before torch is imported: its OpenMP pool's size and wait policy are read from the environment."""
    environ.update(WAIT_ENV)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        environ[key] = str(plan.threads)


# The trainer yields the CPU to the daemon and to the serving runtime (Venom's LLM) on the same machine:
# its niceness is raised by this much over what it inherited (ACADEMY_TRAINER_NICE overrides; 0: not at all).
# 5: on a core it shares with nice-0 work it gets about a quarter (CFS weights 335 vs 1024). Measured with
# bench/bench_trainer.py --busy --tiny on the 2-core VM, one core held busy and the other loaded by other
# work: nice 10 trained 5.7x and 13x slower than idle, nice 5 2.05x, nice 0 1.3x (target <= 2.5x).
NICE_INCREMENT = 5


def lower_priority(environ: dict[str, str] | Any = os.environ) -> int:
    """Raise this process's niceness by ACADEMY_TRAINER_NICE (default NICE_INCREMENT); return it now."""
    raw = environ.get("ACADEMY_TRAINER_NICE", str(NICE_INCREMENT))
    try:
        increment = max(0, int(raw))
    except ValueError:
        increment = NICE_INCREMENT
    if increment:
        try:
            os.nice(increment)
        except OSError:
            pass  # lowering one's own priority is always allowed; a sandbox may still refuse
    return os.getpriority(os.PRIO_PROCESS, 0)
