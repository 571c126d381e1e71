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
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import structlog

import academyd
from academyd.childenv import child_env
from academyd.files import atomic_write_json
from academyd.habitat import jobdir
from academyd.habitat.base import HabitatError, JobHandle, JobResult, JobStatus, TrainingJob
from academyd.trainer import spec as S

REF_PREFIX = "process:"
JOB_FILE = "job.json"
EXIT_FILE = "exit_code"
CANCEL_FILE = "cancelled"
LIMIT_FILE = "limit.json"
STDOUT_FILE = "trainer.stdout"
STDERR_FILE = "trainer.stderr"

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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: Any) -> None:
    atomic_write_json(path, data, sort_keys=True)


class ProcessHabitat:
    """Runs `<trainer_python> -m academyd.trainer <output_dir>/spec.json` as a local process group."""

    name = "process"

    def __init__(
        self,
        trainer_python: Path | str | None = None,
        *,
        poll_s: float = 0.25,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.trainer_python = Path(trainer_python) if trainer_python else default_trainer_python()
        self.poll_s = poll_s
        self._clock = clock
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._watchdogs: dict[str, asyncio.Task[None]] = {}

    # ------------------------------------------------------------ start / reattach

    async def start(self, job: TrainingJob) -> JobHandle:
        py = self.trainer_python
        if not (py.is_file() and os.access(py, os.X_OK)):
            raise HabitatError(f"trainer environment not found: {py} does not exist; run `make trainer-env` "
                               "(or set training.trainer_python / ACADEMY_TRAINING__TRAINER_PYTHON)")
        out = Path(job.spec.output_dir).resolve()
        out.mkdir(parents=True, exist_ok=True)
        ref = REF_PREFIX + str(out)
        spec = job.spec.replace(output_dir=str(out))
        previous = _read_json(out / JOB_FILE)
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
            _write_json(out / JOB_FILE, record)
            return self._adopt(ref, job.run_id, record, out)
        for name in (EXIT_FILE, CANCEL_FILE, LIMIT_FILE):
            (out / name).unlink(missing_ok=True)
        spec_path = out / S.SPEC_FILE
        _write_json(spec_path, spec.to_dict())
        events_path = out / S.EVENTS_FILE
        offset = events_path.stat().st_size if events_path.exists() else 0
        # Written before the launch: a daemon that dies right after it still knows this attempt (see start).
        record = self._new_record(ref, job, spec, offset)
        _write_json(out / JOB_FILE, record)
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
        _write_json(out / JOB_FILE, record)
        self._children[ref] = proc
        handle = JobHandle(ref=ref, run_id=job.run_id, output_dir=str(out))
        self._watch(handle, record)
        return handle

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

    def _adopt(self, ref: str, run_id: str, record: dict[str, Any], out: Path) -> JobHandle:
        structlog.get_logger("academyd.habitat").warning(
            "job_adopted", run_id=run_id, ref=ref, pid=record.get("pid"),
            reason="a job of this run was already running (the daemon died before it recorded the ref)")
        handle = JobHandle(ref=ref, run_id=run_id, output_dir=str(out))
        self._watch(handle, record)
        return handle

    async def reattach(self, ref: str) -> JobHandle | None:
        if not ref.startswith(REF_PREFIX):
            return None
        out = Path(ref[len(REF_PREFIX) :])
        record = _read_json(out / JOB_FILE)
        if not record or record.get("ref") != ref:
            return None
        handle = JobHandle(ref=ref, run_id=record.get("run_id", ""), output_dir=str(out))
        if await self._is_alive(record):
            self._watch(handle, record)
        return handle

    # ------------------------------------------------------------ observe

    def _alive(self, record: dict[str, Any]) -> bool:
        ref = record.get("ref", "")
        child = self._children.get(ref)
        if child is not None and child.poll() is not None:  # reap our own child: no zombie looks alive
            return False
        if record.get("pid") is None:
            return False  # never launched (or launched and then lost by a daemon that died: see start)
        stat = _proc_stat(int(record["pid"]))
        return stat is not None and stat[0] != "Z" and stat[2] == record.get("proc_start")

    async def _is_alive(self, record: dict[str, Any]) -> bool:
        """`_alive` from async code: here a /proc read; a habitat whose check is an engine call (Docker)
        runs it off the event loop."""
        return self._alive(record)

    async def _concluded(self, handle: JobHandle) -> tuple[JobStatus, dict[str, Any]]:
        """`_conclude` from async code (see `_is_alive`)."""
        return self._conclude(handle)

    def _record(self, handle: JobHandle) -> dict[str, Any]:
        record = _read_json(Path(handle.output_dir) / JOB_FILE)
        if not record:
            raise HabitatError(f"{handle.output_dir} has no {JOB_FILE}: not a process-habitat job")
        return record

    async def status(self, handle: JobHandle) -> JobStatus:
        return (await self._concluded(handle))[0]

    def _final_event(self, handle: JobHandle, record: dict[str, Any]) -> dict[str, Any] | None:
        out = Path(handle.output_dir)
        finals: list[dict[str, Any]] = []
        offset = int(record.get("events_offset", 0))
        while True:  # each read is bounded: on to the end of the file
            events, after = self._events_since(handle, offset)
            finals += [e for e in events if e["type"] in S.FINAL_EVENTS]
            if after == offset:
                break
            offset = after
        if not finals:
            # An error before the trainer knew its output_dir (a bad spec) only reached stdout.
            events, _ = jobdir.parse_events(jobdir.read_tail(out / STDOUT_FILE))
            finals = [e for e in events if e["type"] == S.EVENT_ERROR and e.get("time", 0) >= record["started_at"]]
        return finals[-1] if finals else None

    def _conclude(self, handle: JobHandle) -> tuple[JobStatus, dict[str, Any]]:
        """Status and what is known of the end: exit_code, reason, error_code, final event."""
        record = self._record(handle)
        if self._alive(record):
            return JobStatus.RUNNING, {}
        out = Path(handle.output_dir)
        exit_code: int | None = None
        with contextlib.suppress(OSError, ValueError):
            exit_code = int((out / EXIT_FILE).read_text().strip())
        final = self._final_event(handle, record)
        limit = _read_json(out / LIMIT_FILE)
        cancelled = (out / CANCEL_FILE).exists()
        if exit_code is None and final is not None:
            exit_code = final.get("exit_code", S.EXIT_OK if final["type"] == S.EVENT_DONE else None)
        info: dict[str, Any] = {"exit_code": exit_code, "final": final, "reason": None, "error_code": None}
        if final is not None and final["type"] == S.EVENT_ERROR:
            info["reason"], info["error_code"] = final.get("reason"), final.get("code")
        if limit:
            info["reason"], info["error_code"] = limit["reason"], limit["code"]
            return JobStatus.FAILED, info
        if cancelled:
            info["reason"], info["error_code"] = info["reason"] or "cancelled", "cancelled"
            return JobStatus.CANCELLED, info
        if exit_code == S.EXIT_OK and final is not None and final["type"] == S.EVENT_DONE:
            return JobStatus.SUCCEEDED, info
        if exit_code == S.EXIT_CANCELLED:
            return JobStatus.CANCELLED, info
        if exit_code is not None:
            if info["reason"] is None:
                info["reason"] = f"trainer exited with {exit_code} ({S.EXIT_NAMES.get(exit_code, 'killed?')}); " \
                                 f"see {out / STDERR_FILE}"
                info["error_code"] = S.EXIT_NAMES.get(exit_code, "killed")
            return JobStatus.FAILED, info
        info["reason"] = (f"the trainer (pid {record['pid']}) is gone without an exit code; it was killed "
                          f"from outside or the host restarted; the same spec resumes from its checkpoint")
        info["error_code"] = "lost"
        return JobStatus.LOST, info

    async def progress(self, handle: JobHandle) -> AsyncIterator[dict[str, Any]]:
        record = self._record(handle)
        offset = int(record.get("events_offset", 0))
        while True:
            # Check liveness before reading, so the last read after death sees every line written.
            running = await self._is_alive(record)
            before = offset
            events, offset = self._events_since(handle, offset)
            for event in events:
                yield event
                if event["type"] in S.FINAL_EVENTS:
                    await self._wait_exit(record)
                    limit = _read_json(Path(handle.output_dir) / LIMIT_FILE)
                    if limit:
                        # The trainer only saw a SIGTERM; the real reason is the limit the watchdog hit.
                        yield self._habitat_error(JobStatus.FAILED, limit["code"], limit["reason"],
                                                  event.get("exit_code"))
                    return
            if not running and offset != before:
                continue  # each read is bounded: read on to the end before concluding
            if not running:
                status, info = await self._concluded(handle)
                if info.get("final") is not None:
                    yield info["final"]  # the trainer's last word reached only stdout (a bad spec)
                    return
                # The trainer died without its last word (killed, over a limit): say it for it.
                yield self._habitat_error(status, info.get("error_code"), info.get("reason"), info.get("exit_code"))
                return
            await asyncio.sleep(self.poll_s)

    def _habitat_error(self, status: JobStatus, code: str | None, reason: str | None,
                       exit_code: int | None) -> dict[str, Any]:
        return {
            "type": S.EVENT_ERROR,
            "time": round(self._clock(), 3),
            "origin": "habitat",
            "status": status.value,
            "code": code,
            "reason": reason,
            "exit_code": exit_code,
        }

    async def _wait_exit(self, record: dict[str, Any], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while await self._is_alive(record) and time.monotonic() < deadline:
            await asyncio.sleep(self.poll_s / 2)

    async def result(self, handle: JobHandle) -> JobResult:
        record = self._record(handle)
        while await self._is_alive(record):
            await asyncio.sleep(self.poll_s)
        await self._wait_exit_file(handle)
        status, info = await self._concluded(handle)
        summary = None
        adapter = None
        if status is JobStatus.SUCCEEDED:
            try:
                summary, adapter = await self._collect(handle)
            except HabitatError as exc:
                status, info["reason"] = JobStatus.FAILED, str(exc)
                info["error_code"] = getattr(exc, "code", "unsafe_output")
        return JobResult(
            status=status,
            exit_code=info.get("exit_code"),
            reason=info.get("reason"),
            summary=summary,
            adapter_path=adapter,
            error_code=info.get("error_code"),
        )

    def _events_since(self, handle: JobHandle, offset: int) -> tuple[list[dict[str, Any]], int]:
        """The trainer's events after `offset` in its events.jsonl (a bounded read), and the offset after them."""
        try:
            return jobdir.read_events(Path(handle.output_dir), offset)
        except jobdir.UnsafeOutput:
            return [], offset  # not a file the trainer wrote (a link, a FIFO): its exit says how it ended

    async def _collect(self, handle: JobHandle) -> tuple[dict[str, Any] | None, str]:
        """What a succeeded job hands over: its summary and the adapter directory the daemon reads."""
        out = Path(handle.output_dir)
        return _read_json(out / S.SUMMARY_FILE), str(out / S.ADAPTER_DIR)

    async def _wait_exit_file(self, handle: JobHandle) -> None:
        # The shell writes exit_code a moment after the trainer's last event; its group may outlive it briefly.
        for _ in range(8):
            if (Path(handle.output_dir) / EXIT_FILE).exists():
                return
            await asyncio.sleep(self.poll_s / 4)

    # ------------------------------------------------------------ control

    async def cancel(self, handle: JobHandle, *, grace_s: float = 10.0) -> None:
        record = self._record(handle)
        if not await self._is_alive(record):
            return
        _write_json(Path(handle.output_dir) / CANCEL_FILE, {"time": self._clock()})
        await self._stop(record, grace_s)

    async def _stop(self, record: dict[str, Any], grace_s: float) -> None:
        pgid = int(record["pgid"])
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while await self._is_alive(record) and time.monotonic() < deadline:
            await asyncio.sleep(self.poll_s / 2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        while await self._is_alive(record):
            await asyncio.sleep(self.poll_s / 4)

    def _watch(self, handle: JobHandle, record: dict[str, Any]) -> None:
        old = self._watchdogs.get(handle.ref)
        if old is None or old.done():
            self._watchdogs[handle.ref] = asyncio.get_running_loop().create_task(
                self._watchdog(handle, record), name=f"habitat-watchdog:{handle.run_id}"
            )

    async def _watchdog(self, handle: JobHandle, record: dict[str, Any]) -> None:
        """Enforce the time and memory limits while the job runs."""
        out = Path(handle.output_dir)
        time_limit = record.get("time_limit_s")
        mem_limit = record.get("memory_limit_mb")
        while await self._is_alive(record):
            elapsed = self._clock() - float(record["started_at"])
            if time_limit and elapsed > float(time_limit):
                _write_json(out / LIMIT_FILE, {"code": "time_limit", "reason": (
                    f"time limit {time_limit:g} s reached; raise training.time_limit_s or train less "
                    "(the checkpoint is kept: the same spec resumes)")})
                await self._stop(record, grace_s=10.0)
                return
            if mem_limit:
                rss = _group_rss_bytes(int(record["pgid"]))
                if rss > int(mem_limit) * 2**20:
                    _write_json(out / LIMIT_FILE, {"code": "memory_limit", "reason": (
                        f"memory limit {mem_limit} MB exceeded (resident {rss / 2**20:.0f} MB); raise "
                        "training.memory_limit_mb or lower batch_size/max_length")})
                    await self._stop(record, grace_s=0.0)
                    return
            await asyncio.sleep(self.poll_s)

    async def close(self) -> None:
        """Stop watching (jobs keep running; a later reattach watches them again)."""
        for task in self._watchdogs.values():
            task.cancel()
        for task in self._watchdogs.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._watchdogs.clear()
