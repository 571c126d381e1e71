"""The one way the Academy replaces a file that others read (active_adapter.json, a Modelfile, metrics,
a job's control files, the trainer's summary and checkpoint markers, the follower's record, a dataset):
write a temporary file beside it (a fresh name, opened O_EXCL|O_NOFOLLOW: a planted link is never written
through), fsync it, rename it over the target, fsync the directory. A reader sees the old file or the new
one, never half of one, and a power cut after the rename keeps the new one. What is written elsewhere and
moved into place (a streamed download, a directory) lands with `replace_durably`.

`sha256_file` is the one way a file is hashed.

Imports only the standard library: the trainer's interpreter uses it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, *, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: Path, value: Any, *, mode: int = 0o644, indent: int | None = 2,
                      sort_keys: bool = False, allow_nan: bool = True, ensure_ascii: bool = True) -> None:
    text = json.dumps(value, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan, ensure_ascii=ensure_ascii,
                      default=str)
    atomic_write_text(path, text + "\n", mode=mode)


def copy_durably(src: Path, dest: Path) -> None:
    """Copy `src` over `dest` the same way: a fresh temporary beside it, fsync'd, renamed, directory fsync'd."""
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as fh:
            shutil.copyfileobj(fh, out, 1024 * 1024)
            out.flush()
            os.fsync(out.fileno())
        replace_durably(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_durably(src: Path, dest: Path) -> None:
    """Rename `src` (written and fsync'd by the caller: a file or a directory) over `dest`, durably."""
    os.replace(src, dest)
    fsync_dir(dest.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
