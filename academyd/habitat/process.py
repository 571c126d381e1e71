"""The process habitat: the trainer as a local process group, run by the trainer environment's interpreter.

Everything about a job lives in its output directory, so a second daemon (after a restart) re-attaches by
reading files, not by being the parent:

    spec.json        the spec the trainer runs
    job.json         pid, process start time (guards against pid reuse), limits, where this attempt's
                     events begin in events.jsonl
    events.jsonl     the trainer's protocol lines (the progress stream is a tail of this file)
    trainer.stdout   the protocol lines again (and any error printed before events.jsonl existed)
    trainer.stderr   library output and tracebacks
    exit_code        written by the wrapper shell when the trainer exits
    cancelled        written by cancel() before it signals
    limit.json       written by the watchdog before it stops a job over its time or memory limit

The habitat is `academyd.habitat.jobdir.JobWatcher` (the progress stream, the conclusion, cancel, the
watchdog) over a `ProcessRunner` (start, adopt, check, stop and measure a local process group).

The trainer runs under `/bin/sh` (its own session and process group) that records the exit code, so even
a re-attached habitat, which cannot wait() for the process, learns it. Cancel sends SIGTERM to the group
(the trainer saves nothing more and exits 5; the shell ignores it and writes the code), then SIGKILL.

Limits. The time limit is wall-clock from the start, enforced by a watchdog task. The memory limit is on
resident memory, enforced by the same watchdog reading /proc and killing the group: RLIMIT_AS breaks
torch (it reserves far more address space than it touches, CUDA most of all), and RLIMIT_DATA counts
private mappings the allocators reserve but never fill, so a healthy run would fail deep inside an
allocation with an unreadable error, while a watchdog can say which limit was hit. The watchdog runs
while a habitat is attached (started or re-attached) to the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

import academyd
from academyd.childenv import child_env
from academyd.habitat.base import HabitatError, JobHandle, TrainingJob
from academyd.habitat.jobdir import (
    CANCEL_FILE,
    EXIT_FILE,
    JOB_FILE,
    LIMIT_FILE,
    STDERR_FILE,
    STDOUT_FILE,
    JobWatcher,
    UnsafeOutput,
    read_control,
    write_control,
)
from academyd.trainer import spec as S

REF_PREFIX = "process:"

# The shell ignores TERM/INT/HUP so that a signal to the group stops the trainer (which installs its own
# handlers) while the shell stays to record the exit code.
_WRAPPER = "trap '' TERM INT HUP; \"$0\" -m academyd.trainer \"$1\"; echo $? > \"$2.tmp\" && mv \"$2.tmp\" \"$2\""


def package_root() -> Path:
    """The directory holding the `academyd` package: the trainer's PYTHONPATH."""
    return Path(academyd.__file__).resolve().parent.parent


def default_trainer_python() -> Path:
    return package_root() / ".venv-trainer" / "bin" / "python"


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time in clock ticks) of a live process, None if there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[2]), int(fields[19])


def _group_rss_bytes(pgid: int) -> int:
    """Resident memory of every process in the group (the shell and the trainer)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
            fields = raw[raw.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid:
                total += int(Path(entry.path, "statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
    return total


def _find_wrapper(exit_file: Path) -> tuple[int, tuple[str, int, int]] | None:
    """The live wrapper shell of a job whose exit file is `exit_file` (its own argument), if any."""
    want = str(exit_file).encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) >= 6 and argv[:3] == [b"/bin/sh", b"-c", _WRAPPER.encode()] and argv[5] == want:
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[0] != "Z":
                return int(entry.name), stat
    return None


class ProcessRunner:
    """The trainer as a local process group under the wrapper shell (see the module)."""

    def __init__(self, trainer_python: Path | str | None = None, *, poll_s: float = 0.25,
                 clock: Callable[[], float] = time.time) -> None:
        self.trainer_python = Path(trainer_python) if trainer_python else default_trainer_python()
        self.poll_s = poll_s
        self._clock = clock
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    async def start(self, job: TrainingJob) -> tuple[JobHandle, dict[str, Any]]:
        py = self.trainer_python
        if not (py.is_file() and os.access(py, os.X_OK)):
            raise HabitatError(f"trainer environment not found: {py} does not exist; run `make trainer-env` "
                               "(or set training.trainer_python / ACADEMY_TRAINING__TRAINER_PYTHON)")
        out = Path(job.spec.output_dir).resolve()
        out.mkdir(parents=True, exist_ok=True)
        ref = REF_PREFIX + str(out)
        spec = job.spec.replace(output_dir=str(out))
        previous = read_control(out / JOB_FILE)
        if previous and previous.get("ref") == ref and self._alive(previous):
            if previous.get("run_id") == job.run_id and previous.get("spec_hash") == S.spec_hash(spec):
                # This very job, started by a daemon that died before it recorded the ref: adopt it.
                return self._adopt(ref, job.run_id, previous, out)
            raise HabitatError(f"a trainer already runs in {out} (pid {previous['pid']}); cancel it "
                               "or give the job another output_dir")
        orphan = _find_wrapper(out / EXIT_FILE)
        if orphan is not None:
            # Launched, but its pid never reached job.json (the daemon died in between).
            same = bool(previous and previous.get("ref") == ref and previous.get("run_id") == job.run_id
                    and previous.get("spec_hash") == S.spec_hash(spec))
            if not same:
                raise HabitatError(f"a trainer already runs in {out} (pid {orphan[0]}); cancel it "
                                   "or give the job another output_dir")
            pid, stat = orphan
            record = {**previous, "pid": pid, "pgid": stat[1], "proc_start": stat[2]}
            write_control(out / JOB_FILE, record)
            return self._adopt(ref, job.run_id, record, out)
        for name in (EXIT_FILE, CANCEL_FILE, LIMIT_FILE):
            (out / name).unlink(missing_ok=True)
        spec_path = out / S.SPEC_FILE
        write_control(spec_path, spec.to_dict())
        events_path = out / S.EVENTS_FILE
        offset = events_path.stat().st_size if events_path.exists() else 0
        # Written before the launch: a daemon that dies right after it still knows this attempt (see start).
        record = self._new_record(ref, job, spec, offset)
        write_control(out / JOB_FILE, record)
        env = child_env({**job.env, "PYTHONUNBUFFERED": "1"}, pythonpath=str(package_root()))
        with (out / STDOUT_FILE).open("ab") as so, (out / STDERR_FILE).open("ab") as se:
            # Popen returns at once. Not asyncio's subprocess: its child watcher reaps for the loop, and a
            # re-attached habitat must find the same files whether or not it is the parent.
            proc = subprocess.Popen(  # noqa: ASYNC220
                ["/bin/sh", "-c", _WRAPPER, str(py), str(spec_path), str(out / EXIT_FILE)],
                stdin=subprocess.DEVNULL,
                stdout=so,
                stderr=se,
                env=env,
                cwd=str(out),
                start_new_session=True,  # own process group: cancel reaches the trainer, not the daemon
            )
        stat = _proc_stat(proc.pid)
        record.update(pid=proc.pid, pgid=proc.pid, proc_start=stat[2] if stat else None)
        write_control(out / JOB_FILE, record)
        self._children[ref] = proc
        return JobHandle(ref=ref, run_id=job.run_id, output_dir=str(out)), record

    def _new_record(self, ref: str, job: TrainingJob, spec: S.TrainSpec, events_offset: int) -> dict[str, Any]:
        return {
            "ref": ref,
            "run_id": job.run_id,
            "pid": None,
            "pgid": None,
            "proc_start": None,
            "started_at": self._clock(),
            "events_offset": events_offset,
            "time_limit_s": job.time_limit_s,
            "memory_limit_mb": job.memory_limit_mb or None,
            "trainer_python": str(self.trainer_python),
            "spec_hash": S.spec_hash(spec),
        }

    def _adopt(self, ref: str, run_id: str, record: dict[str, Any],
               out: Path) -> tuple[JobHandle, dict[str, Any]]:
        structlog.get_logger("academyd.habitat").warning(
            "job_adopted", run_id=run_id, ref=ref, pid=record.get("pid"),
            reason="a job of this run was already running (the daemon died before it recorded the ref)")
        return JobHandle(ref=ref, run_id=run_id, output_dir=str(out)), record

    async def reattach(self, ref: str) -> tuple[JobHandle, dict[str, Any]] | None:
        if not ref.startswith(REF_PREFIX):
            return None
        out = Path(ref[len(REF_PREFIX) :])
        record = read_control(out / JOB_FILE)
        if not isinstance(record, dict) or record.get("ref") != ref:
            return None
        return JobHandle(ref=ref, run_id=record.get("run_id", ""), output_dir=str(out)), record

    def _alive(self, record: dict[str, Any]) -> bool:
        ref = record.get("ref", "")
        child = self._children.get(ref)
        if child is not None and child.poll() is not None:  # reap our own child: no zombie looks alive
            return False
        if record.get("pid") is None:
            return False  # never launched (or launched and then lost by a daemon that died: see start)
        stat = _proc_stat(int(record["pid"]))
        return stat is not None and stat[0] != "Z" and stat[2] == record.get("proc_start")

    async def is_alive(self, record: dict[str, Any]) -> bool:
        return self._alive(record)  # a /proc read

    async def stop(self, record: dict[str, Any], grace_s: float) -> None:
        """SIGTERM to the group (the trainer saves nothing more and exits 5), SIGKILL after `grace_s`."""
        pgid = int(record["pgid"])
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self._alive(record) and time.monotonic() < deadline:
            await asyncio.sleep(self.poll_s / 2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)

    def rss_bytes(self, record: dict[str, Any]) -> int | None:
        return _group_rss_bytes(int(record["pgid"]))

    def events_dir(self, handle: JobHandle) -> Path:
        return Path(handle.output_dir)

    def refuse(self, handle: JobHandle, exc: UnsafeOutput) -> None:
        """Not a file the trainer wrote (a link, a FIFO): no events from it; its exit says how it ended."""

    async def collect(self, handle: JobHandle) -> tuple[dict[str, Any] | None, str]:
        out = Path(handle.output_dir)
        return read_control(out / S.SUMMARY_FILE), str(out / S.ADAPTER_DIR)

    def lost_reason(self, record: dict[str, Any]) -> str:
        return (f"the trainer (pid {record['pid']}) is gone without an exit code; it was killed "
                f"from outside or the host restarted; the same spec resumes from its checkpoint")

    async def release(self, handle: JobHandle) -> None:
        return None

    async def close(self) -> None:
        return None


class ProcessHabitat(JobWatcher):
    """Runs `<trainer_python> -m academyd.trainer <output_dir>/spec.json` as a local process group: the
    job-directory watcher over a `ProcessRunner`."""

    name = "process"

    def __init__(self, trainer_python: Path | str | None = None, *, poll_s: float = 0.25,
                 clock: Callable[[], float] = time.time) -> None:
        runner = ProcessRunner(trainer_python, poll_s=poll_s, clock=clock)
        super().__init__(runner, poll_s=poll_s, clock=clock)
        self.trainer_python = runner.trainer_python
