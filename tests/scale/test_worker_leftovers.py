"""A worker's trainer never outlives it: the trainer's own watch on its worker (real processes, no model),
and a restarted worker ending what an earlier one left running before it takes work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from academyd.habitat.process import _proc_stat
from academyd.trainer._process import PARENT_ENV, process_start
from academyd.worker.run import end_leftover_trainers

REPO = Path(__file__).resolve().parents[2]


def wait_gone(pid: int, timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    while (st := _proc_stat(pid)) is not None and st[0] != "Z":
        assert time.monotonic() - t0 < timeout, f"{pid} still alive"
        time.sleep(0.02)
    return time.monotonic() - t0


TRAINER = """
import os, sys, time
from academyd.trainer import _process
_process.die_with(os.environ[_process.PARENT_ENV], poll_s=0.1)
open(sys.argv[1], "w").write(f"{os.getpid()} {os.getpgrp()}")
time.sleep(60)
"""

WORKER = """
import os, subprocess, sys, time
from academyd.trainer._process import PARENT_ENV, process_start
me = os.getpid()
# As the process habitat starts a trainer: a shell that ignores TERM/INT/HUP, in a session of its own.
subprocess.Popen(["/bin/sh", "-c", "trap '' TERM INT HUP; $0 $1 $2; echo done", sys.executable, sys.argv[1],
                  sys.argv[2]], start_new_session=True, env={**os.environ, PARENT_ENV: f"{me}:{process_start(me)}"})
time.sleep(60)
"""


def test_a_trainer_ends_its_process_group_when_its_worker_is_sigkilled(tmp_path: Path) -> None:
    (tmp_path / "trainer.py").write_text(TRAINER)
    (tmp_path / "worker.py").write_text(WORKER)
    pidfile = tmp_path / "pids"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(tmp_path / "trainer.py"), str(pidfile)],
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 20
        while not (pidfile.exists() and pidfile.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        pid, shell = map(int, pidfile.read_text().split())  # the trainer and its wrapper (the group leader)
        assert shell != os.getpgrp() and _proc_stat(pid) is not None and _proc_stat(shell) is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        gone = wait_gone(pid)
        wait_gone(shell)
        assert gone < 5.0, gone
    finally:
        proc.kill()
        proc.wait()


def test_a_restarted_worker_ends_the_trainer_an_earlier_one_left(tmp_path: Path) -> None:
    work = tmp_path / "work"
    # A leftover: a trainer-like process group (its command line names academyd.trainer), recorded as the
    # process habitat records one. Beside it, a job whose recorded pid now belongs to another process.
    leftover = subprocess.Popen(["/bin/sh", "-c", "sleep 60 # -m academyd.trainer spec.json"], start_new_session=True)
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        for run_id, proc, start in (("run-1", leftover, process_start(leftover.pid)),
                                    ("run-2", stranger, process_start(stranger.pid)),
                                    ("run-3", stranger, 12345)):
            (work / "jobs" / run_id).mkdir(parents=True)
            (work / "jobs" / run_id / "job.json").write_text(json.dumps({"pid": proc.pid, "proc_start": start}))
        (work / "jobs" / "run-4").mkdir()
        (work / "jobs" / "run-4" / "job.json").write_text("{not json")
        assert end_leftover_trainers(work) == [leftover.pid]
        assert _proc_stat(leftover.pid) is None  # ended (and reaped)
        assert stranger.poll() is None  # not a trainer (run-2), or not the recorded process (run-3)
        assert end_leftover_trainers(work) == []  # the next start finds nothing
    finally:
        for p in (leftover, stranger):
            p.kill()
            p.wait()
