"""The job control directory: owned by the daemon, never writable by the job it describes.

    <runs>/<run_id>/         the control directory (the daemon's; the container never sees it writable)
        spec.json            the spec (mounted read-only into the container as a single file)
        job.json             the daemon's record of the attempt
        exit_code            from the engine, when the container ended
        trainer.stdout/.stderr   the container's logs, copied by the daemon
        cancelled, limit.json    written by the daemon
        output/              the container's only writable mount: events.jsonl, checkpoints/, adapter/,
                             summary.json, loss.jsonl, whatever else the trainer writes
        result/              the daemon's validated copy of what it takes from output/: adapter/,
                             summary.json, loss.jsonl (what the registry and the arena read)

Whatever the daemon reads from `output/` was written by code it does not trust. So every read here goes
component by component from a directory descriptor with O_NOFOLLOW (a symlink anywhere on the path is
refused, a symlinked parent included), takes only regular files with one link (a hard link could alias
a file the daemon owns), opens with O_NONBLOCK (a FIFO cannot hang the daemon), is size-limited, and
JSON is parsed and checked for its shape. A refusal is an `UnsafeOutput` that says what was refused.

`JobWatcher` is a habitat made of this directory and a `Runner` (where the trainer runs: a local process
group, academyd.habitat.process; a container, academyd.habitat.docker): the progress stream (the bounded
event reader), the conclusion (exit code, last event, limit and cancel files), the result, cancel and the
time/memory watchdog are the watcher's, the same for every runner; starting, finding, checking, stopping
and collecting a job are the runner's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from academyd.files import atomic_write_json
from academyd.habitat.base import HabitatError, JobHandle, JobResult, JobStatus, TrainingJob
from academyd.trainer import spec as S

OUTPUT_DIR = "output"
RESULT_DIR = "result"
# The daemon's files of a job, in its directory (the process habitat's is also the trainer's output).
JOB_FILE = "job.json"  # the runner's record of the attempt: where its events begin, its limits, ...
EXIT_FILE = "exit_code"  # the trainer's exit code (from the process wrapper, or the engine)
CANCEL_FILE = "cancelled"  # written by cancel() before it stops the job
LIMIT_FILE = "limit.json"  # written before a job over its time or memory limit (or refused) is stopped
STDOUT_FILE = "trainer.stdout"
STDERR_FILE = "trainer.stderr"
MAX_JSON_BYTES = 1 << 20
MAX_EVENT_LINE_BYTES = 64 << 10
MAX_EVENTS_READ_BYTES = 4 << 20
MAX_LOG_TAIL_BYTES = 1 << 20
MAX_TREE_BYTES = 64 << 30  # an adapter (LoRA weights, tokenizer); far more than any real one
MAX_TREE_FILES = 10_000

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class UnsafeOutput(HabitatError):
    """The job's output holds something the daemon refuses to read (a symlink, a hard link, a device,
    an oversized or malformed file). The message names it."""

    code = "unsafe_output"


@dataclass(frozen=True)
class JobDir:
    """The paths of one job's control directory (`root`, the daemon's) and of its output mount."""

    root: Path

    @property
    def output(self) -> Path:
        return self.root / OUTPUT_DIR

    @property
    def result(self) -> Path:
        return self.root / RESULT_DIR

    def __truediv__(self, name: str) -> Path:
        return self.root / name


def _parts(rel: str | os.PathLike[str]) -> tuple[str, ...]:
    parts = PurePosixPath(os.fspath(rel)).parts
    if not parts or PurePosixPath(os.fspath(rel)).is_absolute() or any(p in ("..", ".") for p in parts):
        raise UnsafeOutput(f"refused path {os.fspath(rel)!r}: not a plain relative path")
    return parts


def _open_dir(root: Path, parts: tuple[str, ...], shown: str) -> int:
    """A descriptor of root/parts..., every component opened without following a symlink."""
    try:
        top = os.open(root, _DIR_FLAGS)
    except OSError as exc:
        raise _refusal(exc, str(root)) from None
    try:
        return _open_dir_at(top, parts, shown)
    finally:
        os.close(top)


def _refusal(exc: OSError, shown: str) -> OSError:
    if exc.errno == errno.ENOENT:
        return FileNotFoundError(errno.ENOENT, "no such file", shown)
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return UnsafeOutput(f"refused {shown}: a symlink (or a symlinked parent) in the job's output; the "
                            "daemon reads only regular files and directories the job wrote itself")
    return UnsafeOutput(f"cannot read {shown} from the job's output: {exc.strerror}")


def _check_regular(fd: int, shown: str, max_bytes: int) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeOutput(f"refused {shown}: not a regular file (a FIFO, device or socket in the job's output)")
    if st.st_nlink != 1:
        raise UnsafeOutput(f"refused {shown}: it has {st.st_nlink} hard links (it may alias another file)")
    if st.st_size > max_bytes:
        raise UnsafeOutput(f"refused {shown}: {st.st_size} bytes, over the limit of {max_bytes}")
    return st


def open_file(root: Path, rel: str | os.PathLike[str], max_bytes: int) -> int:
    """A read-only descriptor of the regular file root/rel (see the module docstring for the checks)."""
    parts = _parts(rel)
    shown = str(root.joinpath(*parts))
    dfd = _open_dir(root, parts[:-1], shown)
    try:
        fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=dfd)
    except OSError as exc:
        raise _refusal(exc, shown) from None
    finally:
        os.close(dfd)
    try:
        _check_regular(fd, shown, max_bytes)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(root: Path, rel: str | os.PathLike[str], max_bytes: int = MAX_JSON_BYTES) -> bytes | None:
    """The content of root/rel; None if it does not exist."""
    try:
        fd = open_file(root, rel, max_bytes)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as fh:
        return fh.read(max_bytes + 1)[:max_bytes]


def read_json_object(root: Path, rel: str | os.PathLike[str], max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any] | None:
    """root/rel as a JSON object; None if missing; UnsafeOutput if it is not one."""
    data = read_bytes(root, rel, max_bytes)
    if data is None:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        raise UnsafeOutput(f"refused {root / os.fspath(rel)}: not valid JSON") from None
    if not isinstance(value, dict):
        raise UnsafeOutput(f"refused {root / os.fspath(rel)}: not a JSON object")
    return value


def read_from(root: Path, rel: str | os.PathLike[str], offset: int,
              max_bytes: int = MAX_EVENTS_READ_BYTES) -> tuple[bytes, int]:
    """Up to `max_bytes` of root/rel from `offset` (an append-only log), and the file's size then."""
    try:
        fd = open_file(root, rel, max_bytes=1 << 62)  # a log grows; each read is bounded instead
    except FileNotFoundError:
        return b"", 0
    try:
        size = os.fstat(fd).st_size
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, max_bytes), size
    finally:
        os.close(fd)


def read_tail(path: Path, max_bytes: int = MAX_LOG_TAIL_BYTES) -> bytes:
    """The last `max_bytes` of a daemon-owned log the job fills (its stdout copy)."""
    try:
        fd = os.open(path, _FILE_FLAGS)
    except OSError:
        return b""
    try:
        size = os.fstat(fd).st_size
        os.lseek(fd, max(0, size - max_bytes), os.SEEK_SET)
        return os.read(fd, max_bytes)
    finally:
        os.close(fd)


def _walk(dfd: int, shown: str) -> Iterator[tuple[str, str, int]]:
    """(relative path, kind, size) of every entry under the directory `dfd`, depth first; refuses links."""
    with os.scandir(dfd) as entries:
        items = sorted(entries, key=lambda e: e.name)
    for entry in items:
        name = entry.name
        st = entry.stat(follow_symlinks=False)
        where = f"{shown}/{name}"
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeOutput(f"refused {where}: a symlink in the job's output")
        if stat.S_ISDIR(st.st_mode):
            yield name, "dir", 0
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=dfd)
            except OSError as exc:
                raise _refusal(exc, where) from None
            try:
                for rel, kind, size in _walk(sub, where):
                    yield f"{name}/{rel}", kind, size
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            yield name, "file", st.st_size
        else:
            raise UnsafeOutput(f"refused {where}: not a regular file or directory")


def copy_tree(root: Path, rel: str, dest: Path, *, max_bytes: int = MAX_TREE_BYTES,
              max_files: int = MAX_TREE_FILES) -> None:
    """Copy the directory root/rel into `dest` (replaced), refusing links and special files, bounded."""
    parts = _parts(rel)
    shown = str(root.joinpath(*parts))
    top = _open_dir(root, parts, shown)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    total = files = 0
    try:
        for relpath, kind, _ in list(_walk(top, shown)):
            target = tmp / relpath
            if kind == "dir":
                target.mkdir()
                continue
            files += 1
            if files > max_files:
                raise UnsafeOutput(f"refused {shown}: more than {max_files} files")
            sub_parts = tuple(relpath.split("/"))
            dfd = _open_dir_at(top, sub_parts[:-1], f"{shown}/{relpath}")
            try:
                fd = os.open(sub_parts[-1], _FILE_FLAGS, dir_fd=dfd)
            except OSError as exc:
                raise _refusal(exc, f"{shown}/{relpath}") from None
            finally:
                os.close(dfd)
            with os.fdopen(fd, "rb") as src:
                st = _check_regular(src.fileno(), f"{shown}/{relpath}", max_bytes - total)
                with open(target, "wb") as out:
                    copied = _copy_bounded(src, out, st.st_size)
            total += copied
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(top)


def _open_dir_at(top: int, parts: tuple[str, ...], shown: str) -> int:
    fd = os.dup(top)
    try:
        for part in parts:
            nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except OSError as exc:
        os.close(fd)
        raise _refusal(exc, shown) from None
    return fd


def _copy_bounded(src: Any, out: Any, size: int) -> int:
    """Copy what fstat said the file holds, no more (it may still grow if a writer is alive)."""
    left, copied = size, 0
    while left > 0:
        chunk = src.read(min(left, 1 << 20))
        if not chunk:
            break
        out.write(chunk)
        left -= len(chunk)
        copied += len(chunk)
    return copied


def read_events(root: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The trainer's protocol events in root/events.jsonl after `offset` (one read of at most
    MAX_EVENTS_READ_BYTES, lines checked by `parse_events`) and the offset after the bytes they used.
    Every habitat and the worker read the trainer's events through this; UnsafeOutput if it refuses the file."""
    from academyd.trainer import spec as S

    data, _ = read_from(root, S.EVENTS_FILE, offset)
    events, used = parse_events(data)
    return events, offset + used


def parse_events(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """Protocol events in `data` (complete lines only) and how many bytes they used.

    A line over MAX_EVENT_LINE_BYTES, not JSON, or not a known event shape is skipped. A chunk with no
    newline at all that is as long as a read is skipped whole, so a flood without newlines cannot stall
    the reader.
    """
    end = data.rfind(b"\n") + 1
    if end == 0:
        return [], len(data) if len(data) >= MAX_EVENTS_READ_BYTES else 0
    events = []
    for line in data[:end].splitlines():
        if len(line) > MAX_EVENT_LINE_BYTES:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if valid_event(event, S.EVENT_TYPES):
            events.append(event)
    return events, end


_NUMERIC = ("time", "step", "total_steps", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s",
            "eval_loss", "exit_code")


def valid_event(event: Any, types: tuple[str, ...]) -> bool:
    """A dict with a known `type`, numbers where numbers belong, short strings elsewhere."""
    if not isinstance(event, dict) or event.get("type") not in types:
        return False
    for key in _NUMERIC:
        value = event.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return False
    return all(not isinstance(v, str) or len(v) <= 16_384 for v in event.values())


# ------------------------------------------------------------ the daemon's own files of a job


def read_control(path: Path) -> Any:
    """A JSON file the daemon wrote (job.json, limit.json, ...); None if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_control(path: Path, data: Any) -> None:
    atomic_write_json(path, data, sort_keys=True)


# ------------------------------------------------------------ the watcher


class Runner(Protocol):
    """Where a job's trainer runs, as the watcher needs it; `record` is the job's job.json."""

    async def start(self, job: TrainingJob) -> tuple[JobHandle, dict[str, Any]]: ...  # or adopt this job
    async def reattach(self, ref: str) -> tuple[JobHandle, dict[str, Any]] | None: ...
    async def is_alive(self, record: dict[str, Any]) -> bool: ...  # once not, its end is in the job's files
    async def stop(self, record: dict[str, Any], grace_s: float) -> None: ...  # ask, force after grace_s
    def rss_bytes(self, record: dict[str, Any]) -> int | None: ...  # None: the runner limits memory
    def events_dir(self, handle: JobHandle) -> Path: ...  # where the trainer writes events.jsonl
    def refuse(self, handle: JobHandle, exc: UnsafeOutput) -> None: ...  # from the loop or a thread
    async def collect(self, handle: JobHandle) -> tuple[dict[str, Any] | None, str]: ...  # summary, adapter
    def lost_reason(self, record: dict[str, Any]) -> str: ...
    async def release(self, handle: JobHandle) -> None: ...  # the end is in the files: let go of the job
    async def close(self) -> None: ...


class JobWatcher:
    """A habitat: a job directory watched, with a `Runner` for where the trainer runs (see the module)."""

    name = "jobdir"

    def __init__(self, runner: Runner, *, poll_s: float = 0.25,
                 clock: Callable[[], float] = time.time) -> None:
        self.runner = runner
        self.poll_s = poll_s
        self._clock = clock
        self._watchdogs: dict[str, asyncio.Task[None]] = {}

    async def start(self, job: TrainingJob) -> JobHandle:
        handle, record = await self.runner.start(job)
        self._watch(handle, record)
        return handle

    async def reattach(self, ref: str) -> JobHandle | None:
        found = await self.runner.reattach(ref)
        if found is None:
            return None
        handle, record = found
        if await self.runner.is_alive(record):
            self._watch(handle, record)
        return handle

    # ------------------------------------------------------------ observe

    def _record(self, handle: JobHandle) -> dict[str, Any]:
        record = read_control(Path(handle.output_dir) / JOB_FILE)
        if not isinstance(record, dict):
            raise HabitatError(f"{handle.output_dir} has no {JOB_FILE}: not a job of this habitat")
        return record

    async def status(self, handle: JobHandle) -> JobStatus:
        return (await self._concluded(handle))[0]

    async def _concluded(self, handle: JobHandle) -> tuple[JobStatus, dict[str, Any]]:
        """Status and what is known of the end: exit_code, reason, error_code, final event."""
        record = self._record(handle)
        if await self.runner.is_alive(record):
            return JobStatus.RUNNING, {}
        return await asyncio.to_thread(self._conclude, handle, record)

    def _events_since(self, handle: JobHandle, offset: int) -> tuple[list[dict[str, Any]], int]:
        """The trainer's events after `offset` (a bounded read), and the offset after them."""
        try:
            return read_events(self.runner.events_dir(handle), offset)
        except UnsafeOutput as exc:
            self.runner.refuse(handle, exc)
            return [], offset

    def _final_event(self, handle: JobHandle, record: dict[str, Any]) -> dict[str, Any] | None:
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
            events, _ = parse_events(read_tail(Path(handle.output_dir) / STDOUT_FILE))
            finals = [e for e in events if e["type"] == S.EVENT_ERROR and e.get("time", 0) >= record["started_at"]]
        return finals[-1] if finals else None

    def _conclude(self, handle: JobHandle, record: dict[str, Any]) -> tuple[JobStatus, dict[str, Any]]:
        """How an ended job ended, from its files."""
        out = Path(handle.output_dir)
        exit_code: int | None = None
        with contextlib.suppress(OSError, ValueError):
            exit_code = int((out / EXIT_FILE).read_text().strip())
        final = self._final_event(handle, record)
        limit = read_control(out / LIMIT_FILE)
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
        info["reason"], info["error_code"] = self.runner.lost_reason(record), "lost"
        return JobStatus.LOST, info

    async def progress(self, handle: JobHandle) -> AsyncIterator[dict[str, Any]]:
        record = self._record(handle)
        offset = int(record.get("events_offset", 0))
        while True:
            # Check liveness before reading, so the last read after death sees every line written.
            running = await self.runner.is_alive(record)
            before = offset
            events, offset = self._events_since(handle, offset)
            for event in events:
                yield event
                if event["type"] in S.FINAL_EVENTS:
                    await self._wait_exit(record)
                    limit = read_control(Path(handle.output_dir) / LIMIT_FILE)
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
        while await self.runner.is_alive(record) and time.monotonic() < deadline:
            await asyncio.sleep(self.poll_s / 2)

    async def result(self, handle: JobHandle) -> JobResult:
        record = self._record(handle)
        while await self.runner.is_alive(record):
            await asyncio.sleep(self.poll_s)
        await self._wait_exit_file(handle)
        status, info = await self._concluded(handle)
        summary = None
        adapter = None
        if status is JobStatus.SUCCEEDED:
            try:
                summary, adapter = await self.runner.collect(handle)
            except HabitatError as exc:
                status, info["reason"] = JobStatus.FAILED, str(exc)
                info["error_code"] = getattr(exc, "code", "unsafe_output")
        await self.runner.release(handle)
        return JobResult(
            status=status,
            exit_code=info.get("exit_code"),
            reason=info.get("reason"),
            summary=summary,
            adapter_path=adapter,
            error_code=info.get("error_code"),
        )

    async def _wait_exit_file(self, handle: JobHandle) -> None:
        # The process wrapper writes exit_code a moment after the trainer's last event.
        for _ in range(8):
            if (Path(handle.output_dir) / EXIT_FILE).exists():
                return
            await asyncio.sleep(self.poll_s / 4)

    # ------------------------------------------------------------ control

    async def cancel(self, handle: JobHandle, *, grace_s: float = 10.0) -> None:
        record = self._record(handle)
        if not await self.runner.is_alive(record):
            return
        write_control(Path(handle.output_dir) / CANCEL_FILE, {"time": self._clock()})
        await self._stop(record, grace_s)

    async def _stop(self, record: dict[str, Any], grace_s: float) -> None:
        await self.runner.stop(record, grace_s)
        while await self.runner.is_alive(record):
            await asyncio.sleep(self.poll_s / 4)

    def _watch(self, handle: JobHandle, record: dict[str, Any]) -> None:
        old = self._watchdogs.get(handle.ref)
        if old is None or old.done():
            self._watchdogs[handle.ref] = asyncio.get_running_loop().create_task(
                self._watchdog(handle, record), name=f"habitat-watchdog:{handle.run_id}"
            )

    async def _watchdog(self, handle: JobHandle, record: dict[str, Any]) -> None:
        """Enforce the time limit, and the memory limit where the runner does not, while the job runs."""
        out = Path(handle.output_dir)
        time_limit = record.get("time_limit_s")
        mem_limit = record.get("memory_limit_mb")
        while await self.runner.is_alive(record):
            elapsed = self._clock() - float(record["started_at"])
            if time_limit and elapsed > float(time_limit):
                write_control(out / LIMIT_FILE, {"code": "time_limit", "reason": (
                    f"time limit {time_limit:g} s reached; raise training.time_limit_s or train less "
                    "(the checkpoint is kept: the same spec resumes)")})
                await self._stop(record, grace_s=10.0)
                return
            rss = self.runner.rss_bytes(record) if mem_limit else None
            if mem_limit and rss is not None and rss > int(mem_limit) * 2**20:
                write_control(out / LIMIT_FILE, {"code": "memory_limit", "reason": (
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
        await self.runner.close()
