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
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from academyd.habitat.base import HabitatError

OUTPUT_DIR = "output"
RESULT_DIR = "result"
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
    from academyd.trainer import spec as S

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
