"""The host's side of the container's mounts: the spec's paths made absolute (the container sees them at
the same place), the control directory and the output mount prepared, the output directory handed to the
container's uid, and the inputs checked readable by that uid before the engine is asked for anything."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from academyd.habitat.base import HabitatError
from academyd.habitat.jobdir import CANCEL_FILE, EXIT_FILE, LIMIT_FILE, JobDir, write_control
from academyd.trainer import spec as S


def unreadable(paths: Sequence[str], uid: int, gid: int, *, limit: int = 5) -> list[str]:
    """Files and directories under `paths` that `uid:gid` (no supplementary groups) cannot read."""
    bad: list[str] = []

    def check(path: str, st: os.stat_result) -> None:
        need = 0o5 if stat.S_ISDIR(st.st_mode) else 0o4  # directories: read and search
        bits = st.st_mode & 0o7
        if st.st_uid == uid:
            bits = (st.st_mode >> 6) & 0o7
        elif st.st_gid == gid:
            bits = (st.st_mode >> 3) & 0o7
        if bits & need != need:
            bad.append(path)

    for root in paths:
        try:
            check(root, os.stat(root))
        except OSError:
            continue  # missing: the trainer says so in its own words (bad_input)
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                with contextlib.suppress(OSError):
                    check(os.path.join(dirpath, name), os.stat(os.path.join(dirpath, name)))
            if len(bad) >= limit:
                break
    return bad[:limit]


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)):
            st = os.lstat(name)
            if (st.st_uid, st.st_gid) != (uid, gid):
                os.lchown(name, uid, gid)


def absolute(spec: S.TrainSpec) -> S.TrainSpec:
    """Host paths as absolute paths: the container sees them at the same place."""
    changes: dict[str, Any] = {"dataset_path": str(Path(spec.dataset_path).resolve())}
    if spec.heldout_path:
        changes["heldout_path"] = str(Path(spec.heldout_path).resolve())
    base = Path(spec.base_model).expanduser()
    if not base.is_absolute() and base.is_dir():
        changes["base_model"] = str(base.resolve())
    return spec.replace(**changes)


def prepare(jd: JobDir, spec: S.TrainSpec, uid: int, gid: int) -> None:
    """The control directory (the daemon's, not the container's) and the container's output mount."""
    jd.root.mkdir(parents=True, exist_ok=True)
    if jd.root.is_symlink() or jd.output.is_symlink():
        raise HabitatError(f"{jd.root} or its output/ is a symlink; the job directory must be real")
    for name in (EXIT_FILE, CANCEL_FILE, LIMIT_FILE):
        (jd / name).unlink(missing_ok=True)
    write_control(jd / S.SPEC_FILE, spec.to_dict())
    os.chmod(jd / S.SPEC_FILE, 0o644)  # the container's user reads it (through its single-file mount)
    jd.output.mkdir(exist_ok=True)
    give_output_dir(jd.output, uid, gid)


def give_output_dir(out: Path, uid: int, gid: int) -> None:
    """Make the output directory (an earlier attempt's checkpoints included) the container user's."""
    if os.geteuid() == 0:
        _chown_tree(out, uid, gid)
        return
    st = out.stat()
    if st.st_uid != uid:
        raise HabitatError(f"{out} belongs to uid {st.st_uid}, the container runs as {uid}, and only "
                           f"root may chown: set training.docker_user to {os.getuid()}:{os.getgid()}")
