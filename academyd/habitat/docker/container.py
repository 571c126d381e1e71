"""What a trainer container is, as pure functions of the job and the options: its labels (the engine's
record of which job it is), its user, its name, its bind mounts at the host's own paths, its limits, and the
keyword arguments of `client.containers.create`. Nothing here talks to the engine or touches a file."""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from docker.types import DeviceRequest, LogConfig
from docker.types import Mount as DockerMount

from academyd.habitat.base import HabitatError, TrainingJob
from academyd.habitat.process import package_root
from academyd.trainer import spec as S

LABEL_MANAGED = "academyd.managed"
LABEL_RUN_ID = "academyd.run_id"
LABEL_OUTPUT_DIR = "academyd.output_dir"
LABEL_JOB_DIR = "academyd.job_dir"
LABEL_SPEC_HASH = "academyd.spec_hash"
NOBODY = "65534:65534"


@dataclass(frozen=True)
class Mount:
    """A bind mount: host path `source` at `target` in the container."""

    source: str
    target: str
    read_only: bool = True

    @classmethod
    def parse(cls, text: str) -> Mount:
        """`HOST[:CONTAINER]` (both absolute), mounted read-only."""
        host, _, target = text.partition(":")
        target = target or host
        if not (posixpath.isabs(host) and posixpath.isabs(target)):
            raise HabitatError(f"docker mount {text!r} must be HOST[:CONTAINER] with absolute paths "
                               "(fix training.docker_mounts)")
        return cls(posixpath.normpath(host), posixpath.normpath(target))


@dataclass(frozen=True)
class DockerOptions:
    """How containers are made (from `settings.training`, see `DockerHabitat.from_settings`)."""

    image: str
    python: str = "python"  # the trainer's interpreter inside the image
    user: str = NOBODY  # "uid:gid", never root
    source_dir: str = field(default_factory=lambda: str(package_root()))  # holds the academyd package
    mounts: tuple[Mount, ...] = ()  # extra read-only mounts
    cpus: float = 0.0  # 0: no limit
    pids_limit: int = 4096  # 0: no limit
    shm_mb: int = 1024
    memory_mb: int = 0  # the container's memory when the job sets none; 0: 3/4 of the engine's memory
    # The host's trainer interpreter, if it has one: a GGUF base is dequantized with it once, on the host, and
    # mounted read-only (see DockerHabitat._base_cache); None: only a directory already there is mounted.
    host_trainer_python: str | None = None


def parse_user(user: str) -> tuple[int, int]:
    """uid and gid of "uid:gid"; refuses root and names (the output directory is chowned to the numbers)."""
    m = re.fullmatch(r"(\d+):(\d+)", user.strip())
    if not m:
        raise HabitatError(f"docker user {user!r} must be numeric uid:gid such as 1000:1000 "
                           "(fix training.docker_user)")
    uid, gid = int(m.group(1)), int(m.group(2))
    if uid == 0:
        raise HabitatError("the trainer container must not run as root: set training.docker_user to a "
                           "non-zero uid:gid")
    return uid, gid


def default_user(uid: int, gid: int) -> str:
    """The daemon's own uid:gid (its files stay its own), or nobody when the daemon is root."""
    return NOBODY if uid == 0 else f"{uid}:{gid}"


def container_name(run_id: str, output_dir: str) -> str:
    """A readable, valid and unique-per-output-directory container name."""
    slug = re.sub(r"[^a-zA-Z0-9_.-]+", "-", run_id).strip("-.")[:40] or "run"
    return f"academyd-{slug}-{hashlib.sha256(output_dir.encode()).hexdigest()[:10]}"


def mount_plan(spec: S.TrainSpec, *, source_dir: str, extra: Sequence[Mount] = (),
               missing: Collection[str] = (), spec_file: str | None = None) -> list[Mount]:
    """Every bind mount the trainer needs, at the host's own paths. Pure.

    `spec` has absolute paths; `spec_file` (the daemon's copy, in the job's control directory) is mounted
    read-only as a single file. The output directory comes first and is the only writable mount; a target
    named twice is mounted once (the first wins), as Docker refuses duplicate mount points. Inputs named in
    `missing` (not on the host) are left out: Docker would refuse the container, while the trainer reports
    them as bad input in its own words, as it does in the process habitat.
    """
    out = posixpath.normpath(spec.output_dir)
    package = posixpath.join(posixpath.normpath(source_dir), "academyd")
    wanted = [Mount(out, out, read_only=False), Mount(package, package)]
    if spec_file:
        wanted.append(Mount(posixpath.normpath(spec_file), posixpath.normpath(spec_file)))
    for path in (spec.dataset_path, spec.heldout_path):
        if path and path not in missing:
            wanted.append(Mount(posixpath.normpath(path), posixpath.normpath(path)))
    if posixpath.isabs(spec.base_model) and spec.base_model not in missing:  # else a hub name (mounted cache)
        base = posixpath.normpath(spec.base_model)
        wanted.append(Mount(base, base))
    wanted.extend(extra)
    plan: dict[str, Mount] = {}
    for mount in wanted:
        plan.setdefault(mount.target, mount)
    return list(plan.values())


def has_nvidia(engine_info: dict[str, Any]) -> bool:
    """Whether the engine can hand GPUs to containers (the NVIDIA container runtime is registered)."""
    return "nvidia" in (engine_info.get("Runtimes") or {})


def container_config(job: TrainingJob, options: DockerOptions, *, gpu: bool, job_dir: str,
                     missing: Collection[str] = ()) -> dict[str, Any]:
    """Keyword arguments of `client.containers.create` for `job`. Pure.

    `job_dir` is the job's control directory (the daemon's; see `academyd.habitat.jobdir`): the container
    reads its `spec.json` through a read-only single-file mount and sees nothing else of it.
    `job.spec.output_dir` (the container's only writable mount) and the spec's paths are absolute.
    """
    spec = job.spec
    out = posixpath.normpath(spec.output_dir)
    job_dir = posixpath.normpath(job_dir)
    spec_file = posixpath.join(job_dir, S.SPEC_FILE)
    parse_user(options.user)
    env = {
        "HOME": "/tmp",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "ACADEMY_RUN_ID": job.run_id,
        **job.env,
        "PYTHONPATH": posixpath.normpath(options.source_dir),
        "PYTHONUNBUFFERED": "1",
    }
    mounts = [
        DockerMount(target=m.target, source=m.source, type="bind", read_only=m.read_only)
        for m in mount_plan(spec, source_dir=options.source_dir, extra=options.mounts, missing=missing,
                            spec_file=spec_file)
    ]
    config: dict[str, Any] = {
        "image": options.image,
        "command": [options.python, "-m", "academyd.trainer", spec_file],
        "name": container_name(job.run_id, job_dir),
        # The engine's labels are the container's identity for the daemon (nothing the container writes).
        "labels": {
            LABEL_MANAGED: "true",
            LABEL_RUN_ID: job.run_id,
            LABEL_JOB_DIR: job_dir,
            LABEL_OUTPUT_DIR: out,
            LABEL_SPEC_HASH: S.spec_hash(spec),
        },
        # Bounded logs: the daemon copies them into the control directory when the container ends.
        "log_config": LogConfig(type="json-file", config={"max-size": "20m", "max-file": "2"}),
        "user": options.user,
        "working_dir": out,
        "environment": env,
        "mounts": mounts,
        "network_mode": "none",
        "init": True,
        "read_only": True,
        "tmpfs": {"/tmp": "rw,nosuid,nodev,size=1g,mode=1777"},
        "shm_size": f"{options.shm_mb}m",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "detach": True,
        "stdin_open": False,
        "tty": False,
    }
    if job.memory_limit_mb:
        config["mem_limit"] = f"{job.memory_limit_mb}m"
        config["memswap_limit"] = f"{job.memory_limit_mb}m"  # equal: no swap on top
    if options.cpus:
        config["nano_cpus"] = int(options.cpus * 1e9)
    if options.pids_limit:
        config["pids_limit"] = options.pids_limit
    if gpu:
        config["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    return config


def default_cpus(info: dict[str, Any]) -> float:
    """All of the engine's CPUs but one (at least one), so the host keeps a core for the daemon."""
    return float(max(1, int(info.get("NCPU") or 1) - 1))


def default_memory_mb(info: dict[str, Any]) -> int | None:
    """Three quarters of the engine's memory, so an oversized job is OOM-killed, not the host."""
    total = int(info.get("MemTotal") or 0)
    return int(total * 0.75) // 2**20 or None


def replace_options(options: DockerOptions, **changes: Any) -> DockerOptions:
    return replace(options, **changes)
