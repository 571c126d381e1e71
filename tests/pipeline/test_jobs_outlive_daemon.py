"""Jobs outlive the daemon: `academyd run` (embedded server, process habitat, real trainer) stopped the way
systemd stops it under the shipped unit, on a real cgroup (fixtures/systemd.py), then started again; and a
daemon that dies between starting a job and committing its reference. Each time: the trainer was never
interrupted (one process, one attempt in events.jsonl, no resume) and finishes as the same run.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
import pytest

from academyd.embedded import free_port
from fixtures.nats import REPO, daemon_cmd, daemon_env, db_count, publish, wait_for
from fixtures.systemd import Cgroup, UnitService
from fixtures.trainer import FAST_HYPERPARAMETERS
from test_end_to_end import reversal_lesson

pytestmark = pytest.mark.slow

UNIT = REPO / "systemd" / "academyd.service"

# A daemon that dies (SIGKILL, no stop sequence) right after the habitat started the job, before the
# pipeline commits the job's reference: the crash window of "start, then record".
CRASH_AFTER_START = """
import os, signal, sys
from academyd.habitat.process import ProcessHabitat
real_start = ProcessHabitat.start
async def start(self, job):
    handle = await real_start(self, job)
    os.kill(os.getpid(), signal.SIGKILL)
ProcessHabitat.start = start
from academyd.cli import main
sys.exit(main(["run"]))
"""


def env_for(base_model: Path, port: int) -> dict[str, str]:
    return daemon_env(
        ACADEMY_NATS__EMBEDDED_PORT=str(port),
        ACADEMY_HTTP__ENABLED="false",
        ACADEMY_TRAINING__HABITAT="process",
        ACADEMY_TRAINING__BASE_MODEL=str(base_model),
        ACADEMY_TRAINING__BACKEND="peft",
        ACADEMY_TRAINING__CPU_THREADS="1",
        ACADEMY_TRAINING__HYPERPARAMETERS=json.dumps(
            {**FAST_HYPERPARAMETERS, "epochs": 4, "batch_size": 4, "adjust": False, "save_steps": 1000}),
        ACADEMY_ARENA__BOOTSTRAP_SAMPLES="200",
        ACADEMY_ARENA__GENERATION_SAMPLE="0",
        ACADEMY_ARENA__CPU_THREADS="1",
        ACADEMY_ARENA__GGUF="false",
    )


def identity(cwd: Path, name: str) -> dict[str, str]:
    return {"user": name, "password": (cwd / "data" / "nats" / "users" / f"{name}.password").read_text().strip()}


async def ready(url: str, cwd: Path, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        assert proc.poll() is None, (cwd / "daemon.log").read_text()[-3000:]
        try:
            nc = await nats.connect(url, allow_reconnect=False, **identity(cwd, "operator"))
            try:
                reply = json.loads((await nc.request("academy.status", b"{}", timeout=2)).data)
                if reply.get("ok"):
                    return
            finally:
                await nc.close()
        except Exception:  # not up yet
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("the daemon did not come up")


async def feed_lessons(url: str, cwd: Path, n: int = 120) -> None:
    nc = await nats.connect(url, **identity(cwd, "agent"))
    js = nc.jetstream(timeout=10)
    rng = random.Random(5)
    for i in range(n):
        await publish(js, "lesson.created", reversal_lesson(i, rng), f"ev-lesson-{i}")
    await nc.close()


def job_of(cwd: Path) -> tuple[Path, dict[str, Any]]:
    (job,) = (cwd / "data" / "runs").glob("*/job.json")
    return job.parent, json.loads(job.read_text())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def trained_steps(run_dir: Path) -> int:
    if not (run_dir / "events.jsonl").exists():
        return 0
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    return max([e.get("step", 0) for e in events if e["type"] == "progress"], default=0)


async def finishes_as_one_run(cwd: Path, run_dir: Path, trainer_pid: int) -> None:
    db = cwd / "data" / "academy.db"
    await wait_for(lambda: db_count(db, "SELECT COUNT(*) FROM runs WHERE state IN ('succeeded','failed',"
                                        "'refused')") >= 1, timeout=480, interval=0.5)
    log = (cwd / "daemon.log").read_text(errors="replace")[-4000:]
    assert db_count(db, "SELECT COUNT(*) FROM runs") == 1, log
    assert db_count(db, "SELECT COUNT(*) FROM runs WHERE state='succeeded'") == 1, log
    assert db_count(db, "SELECT COUNT(*) FROM models") == 1, log
    # One trainer process, one attempt: one "start" in the run's events, no resume from a checkpoint.
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    assert [e["type"] for e in events].count("start") == 1, events[:3]
    assert events[-1]["type"] == "done", events[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary.get("resumed_from") is None, summary
    assert json.loads((run_dir / "job.json").read_text())["pid"] == trainer_pid
    assert (run_dir / "exit_code").read_text().strip() == "0"
    assert db_count(db, "SELECT COUNT(*) FROM outbox WHERE subject='academy.training.started'") == 1


def test_the_stop_emulation_signals_as_each_kill_mode_says(tmp_path: Path, unit_cgroup: Cgroup) -> None:
    """The emulation itself, on a main process with a child in its own session (as a trainer is)."""
    survived = {}
    for mode in ("mixed", "control-group", "process"):
        unit = tmp_path / f"{mode}.service"
        unit.write_text(f"[Service]\nExecStart=/bin/true\nKillMode={mode}\nTimeoutStopSec=5s\n")
        service = UnitService(unit, unit_cgroup)
        pidfile = tmp_path / f"{mode}.pid"
        main = service.start([sys.executable, "-c", (
            "import subprocess, sys, time; "
            f"p = subprocess.Popen(['sleep', '60'], start_new_session=True); open({str(pidfile)!r}, 'w').write(str(p.pid)); "
            "time.sleep(60)")])
        for _ in range(100):
            if pidfile.exists() and pidfile.read_text():
                break
            time.sleep(0.05)
        child = int(pidfile.read_text())
        assert child in unit_cgroup.pids()
        service.stop()
        assert main.returncode is not None
        survived[mode] = alive(child)
        unit_cgroup.kill_all()
    assert survived == {"mixed": False, "control-group": False, "process": True}
    assert UnitService(UNIT, unit_cgroup).kill_mode == "process"


async def test_systemctl_restart_under_the_shipped_unit_leaves_the_trainer_running(
    tmp_path: Path, tiny_base_model: Path, unit_cgroup: Cgroup
) -> None:
    cwd = tmp_path / "srv"
    cwd.mkdir()
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    env = env_for(tiny_base_model, port)
    service = UnitService(UNIT, unit_cgroup)
    log = open(cwd / "daemon.log", "ab")  # noqa: SIM115
    try:
        proc = service.start(daemon_cmd("run"), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        await ready(url, cwd, proc)
        await feed_lessons(url, cwd)
        await wait_for(lambda: (cwd / "data" / "runs").is_dir() and list((cwd / "data" / "runs").glob("*/job.json"))
                       and trained_steps(job_of(cwd)[0]) >= 5, timeout=300, interval=0.2)
        run_dir, job = job_of(cwd)
        pid = job["pid"]
        assert pid in unit_cgroup.pids()  # the trainer is the unit's: KillMode decides its fate

        took = service.stop()  # systemctl stop (a restart is a stop, then a start)
        assert proc.returncode == 0 and took < service.timeout_stop_s
        assert alive(pid), "the unit's stop killed the trainer"
        before = trained_steps(run_dir)

        proc = service.start(daemon_cmd("run"), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        await ready(url, cwd, proc)
        assert alive(pid)
        await finishes_as_one_run(cwd, run_dir, pid)
        assert trained_steps(run_dir) > before
        assert "training_reattached" in (cwd / "daemon.log").read_text()
        service.stop()
        assert proc.returncode == 0
    finally:
        unit_cgroup.kill_all()
        log.close()


async def test_a_crash_between_job_start_and_reference_commit_orphans_nothing(
    tmp_path: Path, tiny_base_model: Path
) -> None:
    cwd = tmp_path / "srv"
    cwd.mkdir()
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    env = {**env_for(tiny_base_model, port), "PYTHONPATH": str(REPO)}
    log = open(cwd / "daemon.log", "ab")  # noqa: SIM115
    procs: list[subprocess.Popen[bytes]] = []
    try:
        crashing = subprocess.Popen([sys.executable, "-c", CRASH_AFTER_START], cwd=cwd, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
        procs.append(crashing)
        await ready(url, cwd, crashing)
        await feed_lessons(url, cwd)
        await asyncio.to_thread(crashing.wait, 300)
        assert crashing.returncode == -signal.SIGKILL
        db = cwd / "data" / "academy.db"
        # The crash left the run in training without a job reference, and the trainer running.
        assert db_count(db, "SELECT COUNT(*) FROM runs WHERE state='training' AND job_ref IS NULL") == 1
        run_dir, job = job_of(cwd)
        pid = job["pid"]
        assert alive(pid)

        daemon = subprocess.Popen(daemon_cmd("run"), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(daemon)
        await ready(url, cwd, daemon)
        await finishes_as_one_run(cwd, run_dir, pid)
        assert "job_adopted" in (cwd / "daemon.log").read_text()
        assert db_count(db, f"SELECT COUNT(*) FROM runs WHERE job_ref='process:{run_dir}'") == 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
        with_pid = [json.loads(j.read_text()).get("pid") for j in (cwd / "data" / "runs").glob("*/job.json")]
        for pid in with_pid:
            if pid and alive(pid):
                os.killpg(pid, signal.SIGKILL)
        log.close()
