"""The Docker habitat: the trainer in a container, on a Docker engine reached through the `docker` SDK.

The container
- runs `<python> -m academyd.trainer <output_dir>/spec.json` from a configurable image (the Unsloth image in
  production), with Docker's init as PID 1 so that `docker stop`'s SIGTERM reaches the trainer (which saves
  nothing more and exits 5), then SIGKILL after the grace period;
- has no network (`network_mode="none"`): the trainer is offline by design and a dataset cannot leak;
- runs as a non-root uid:gid with a read-only root filesystem, every capability dropped, no-new-privileges,
  and a tmpfs `/tmp` as HOME;
- sees what it needs at the host's own paths (`mount_plan`): the output directory writable; the dataset, the
  held-out set, a base model given as a path, the `academyd` package and configured extra mounts read-only;
- gets a memory limit (no swap beyond it), CPU and pids limits, and every GPU when the engine has the NVIDIA
  runtime;
- carries labels (`academyd.managed`, `academyd.run_id`, `academyd.output_dir`) by which a restarted daemon
  finds it (`reattach`, `find_jobs`).

The output directory holds the job's bookkeeping exactly as for the process habitat (job.json, events.jsonl,
exit_code, cancelled, limit.json, trainer.stdout/.stderr), so this habitat reuses ProcessHabitat's progress
stream (a tail of events.jsonl on the shared mount) and its conclusion from the final event and exit code.
Only how a job starts, how it is known to be alive and how it is stopped differ. When the container ends,
the habitat copies its exit code and logs into the output directory (an OOM kill becomes limit.json), and
`result` removes the container.

Bind mounts name host paths, so the engine must share the daemon's filesystem (a local engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import posixpath
import re
import stat
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import docker
import structlog
from docker.errors import DockerException, ImageNotFound, NotFound
from docker.types import DeviceRequest
from docker.types import Mount as DockerMount

from academyd.habitat.base import HabitatError, JobHandle, JobResult, JobStatus, TrainingJob
from academyd.habitat.process import (
    CANCEL_FILE,
    EXIT_FILE,
    JOB_FILE,
    LIMIT_FILE,
    STDERR_FILE,
    STDOUT_FILE,
    ProcessHabitat,
    _read_json,
    _write_json,
    package_root,
)
from academyd.trainer import spec as S

if TYPE_CHECKING:
    from docker.models.containers import Container

    from academyd.settings import Settings

log = structlog.get_logger("academyd.habitat.docker")

REF_PREFIX = "docker:"
LABEL_MANAGED = "academyd.managed"
LABEL_RUN_ID = "academyd.run_id"
LABEL_OUTPUT_DIR = "academyd.output_dir"
LABEL_SPEC_HASH = "academyd.spec_hash"
NOBODY = "65534:65534"
_LIVE_STATES = ("created", "running", "restarting", "paused")


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
               missing: Collection[str] = ()) -> list[Mount]:
    """Every bind mount the trainer needs, at the host's own paths. Pure.

    `spec` has absolute paths. The output directory comes first and is the only writable mount; a target
    named twice is mounted once (the first wins), as Docker refuses duplicate mount points. Inputs named in
    `missing` (not on the host) are left out: Docker would refuse the container, while the trainer reports
    them as bad input in its own words, as it does in the process habitat.
    """
    out = posixpath.normpath(spec.output_dir)
    package = posixpath.join(posixpath.normpath(source_dir), "academyd")
    wanted = [Mount(out, out, read_only=False), Mount(package, package)]
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


def container_config(job: TrainingJob, options: DockerOptions, *, gpu: bool,
                     missing: Collection[str] = ()) -> dict[str, Any]:
    """Keyword arguments of `client.containers.create` for `job`. Pure.

    `job.spec.output_dir` and the spec's paths are absolute; the spec file is `<output_dir>/spec.json`.
    """
    spec = job.spec
    out = posixpath.normpath(spec.output_dir)
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
        for m in mount_plan(spec, source_dir=options.source_dir, extra=options.mounts, missing=missing)
    ]
    config: dict[str, Any] = {
        "image": options.image,
        "command": [options.python, "-m", "academyd.trainer", posixpath.join(out, S.SPEC_FILE)],
        "name": container_name(job.run_id, out),
        "labels": {
            LABEL_MANAGED: "true",
            LABEL_RUN_ID: job.run_id,
            LABEL_OUTPUT_DIR: out,
            LABEL_SPEC_HASH: S.spec_hash(spec),
        },
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


def connect(url: str | None, *, timeout_s: float = 60.0) -> docker.DockerClient:
    """A client of the engine at `url` (None: DOCKER_HOST or the default socket); HabitatError if down."""
    try:
        if url:
            return docker.DockerClient(base_url=url, timeout=int(math.ceil(timeout_s)))
        return docker.from_env(timeout=int(math.ceil(timeout_s)))
    except DockerException as exc:
        where = url or os.environ.get("DOCKER_HOST", "the default socket")
        raise HabitatError(f"the Docker engine at {where} does not answer ({exc}); start dockerd, fix "
                           "training.docker_url, or set training.habitat=process") from None


def engine_answers(url: str | None, *, timeout_s: float = 2.0) -> bool:
    """A quick ping: whether a Docker engine answers at `url`."""
    try:
        client = connect(url, timeout_s=timeout_s)
    except HabitatError:
        return False
    try:
        return bool(client.ping())
    except (DockerException, OSError):
        return False
    finally:
        client.close()


def image_present(url: str | None, image: str, *, timeout_s: float = 2.0) -> bool:
    try:
        client = connect(url, timeout_s=timeout_s)
    except HabitatError:
        return False
    try:
        client.images.get(image)
        return True
    except (DockerException, OSError):
        return False
    finally:
        client.close()


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


class DockerHabitat(ProcessHabitat):
    """Runs the trainer in a container. Same interface and output-directory layout as ProcessHabitat.

    Engine calls that may take a while (create, start, stop, remove) run in a worker thread; the quick
    state reads behind `status` and the progress stream are a single inspect over the engine's socket.
    """

    name = "docker"

    def __init__(self, client: docker.DockerClient, options: DockerOptions, *, poll_s: float = 0.25,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(poll_s=poll_s, clock=clock)
        self.client = client
        self.options = options

    @classmethod
    def from_settings(cls, settings: Settings) -> DockerHabitat:
        t = settings.training
        return cls(
            connect(t.docker_url),
            DockerOptions(
                image=t.docker_image,
                python=t.docker_python,
                user=t.docker_user or default_user(os.getuid(), os.getgid()),
                mounts=tuple(Mount.parse(m) for m in t.docker_mounts),
                cpus=t.docker_cpus,
                pids_limit=t.docker_pids_limit,
                shm_mb=t.docker_shm_mb,
            ),
        )

    # ------------------------------------------------------------ start / reattach

    async def start(self, job: TrainingJob) -> JobHandle:
        uid, gid = parse_user(self.options.user)
        out = Path(job.spec.output_dir).resolve()
        out.mkdir(parents=True, exist_ok=True)
        ref = REF_PREFIX + str(out)
        try:
            await asyncio.to_thread(self.client.images.get, self.options.image)
        except ImageNotFound:
            raise HabitatError(f"the Docker image {self.options.image} is not on the engine; build or load "
                               "it there (`docker build` / `docker load`; this habitat never pulls), or fix "
                               "training.docker_image") from None
        for old in await asyncio.to_thread(self._containers, str(out)):
            if old.status in _LIVE_STATES:
                raise HabitatError(f"a trainer container ({old.name}) already runs in {out}; cancel it or "
                                   "give the job another output_dir")
            # An earlier attempt whose result nobody collected: its end is in the files already, or lost.
            await asyncio.to_thread(old.remove, force=True)
        for name in (EXIT_FILE, CANCEL_FILE, LIMIT_FILE):
            (out / name).unlink(missing_ok=True)
        spec = self._absolute(job.spec.replace(output_dir=str(out)))
        job = TrainingJob(spec=spec, run_id=job.run_id, time_limit_s=job.time_limit_s,
                          memory_limit_mb=job.memory_limit_mb, env=job.env)
        inputs = [p for p in (spec.dataset_path, spec.heldout_path, spec.base_model)
                  if p and os.path.isabs(p)]
        blocked = await asyncio.to_thread(unreadable, inputs, uid, gid)
        if blocked:
            raise HabitatError(f"the trainer container runs as {uid}:{gid} and cannot read "
                               f"{', '.join(blocked)}; "
                               "make the inputs readable (chmod -R a+rX) or set training.docker_user")
        _write_json(out / S.SPEC_FILE, spec.to_dict())
        events_path = out / S.EVENTS_FILE
        offset = events_path.stat().st_size if events_path.exists() else 0
        self._give_output_dir(out, uid, gid)
        try:
            gpu = has_nvidia(await asyncio.to_thread(self.client.info))
            missing = [p for p in inputs if not os.path.exists(p)]
            config = container_config(job, self.options, gpu=gpu, missing=missing)
            container = await asyncio.to_thread(lambda: self.client.containers.create(**config))
        except DockerException as exc:
            raise HabitatError(f"the Docker engine refused the trainer container: {exc}") from None
        record = {
            "ref": ref,
            "run_id": job.run_id,
            "container_id": container.id,
            "container_name": config["name"],
            "image": self.options.image,
            "gpu": gpu,
            "started_at": self._clock(),
            "events_offset": offset,
            "pid": None,
            "time_limit_s": job.time_limit_s,
            "memory_limit_mb": None,  # Docker enforces it (an OOM kill shows in the container's state)
            "docker_memory_limit_mb": job.memory_limit_mb or None,
            "spec_hash": S.spec_hash(spec),
        }
        _write_json(out / JOB_FILE, record)  # before start: a daemon that dies now still finds the container
        try:
            await asyncio.to_thread(container.start)
        except DockerException as exc:
            await asyncio.to_thread(container.remove, force=True)
            raise HabitatError(f"the trainer container did not start: {exc}") from None
        await asyncio.to_thread(container.reload)
        record["pid"] = container.attrs.get("State", {}).get("Pid")  # on the engine's host; for messages
        _write_json(out / JOB_FILE, record)
        log.info("docker_job_started", run_id=job.run_id, container=config["name"], image=self.options.image,
                 gpu=gpu, output_dir=str(out))
        handle = JobHandle(ref=ref, run_id=job.run_id, output_dir=str(out))
        self._watch(handle, record)
        return handle

    @staticmethod
    def _absolute(spec: S.TrainSpec) -> S.TrainSpec:
        """Host paths as absolute paths: the container sees them at the same place."""
        changes: dict[str, Any] = {"dataset_path": str(Path(spec.dataset_path).resolve())}
        if spec.heldout_path:
            changes["heldout_path"] = str(Path(spec.heldout_path).resolve())
        base = Path(spec.base_model).expanduser()
        if not base.is_absolute() and base.is_dir():
            changes["base_model"] = str(base.resolve())
        return spec.replace(**changes)

    @staticmethod
    def _give_output_dir(out: Path, uid: int, gid: int) -> None:
        """Make the output directory (an earlier attempt's checkpoints included) the container user's."""
        if os.geteuid() == 0:
            _chown_tree(out, uid, gid)
            return
        st = out.stat()
        if st.st_uid != uid:
            raise HabitatError(f"{out} belongs to uid {st.st_uid}, the container runs as {uid}, and only "
                               f"root may chown: set training.docker_user to {os.getuid()}:{os.getgid()}")

    async def reattach(self, ref: str) -> JobHandle | None:
        if not ref.startswith(REF_PREFIX):
            return None
        out = Path(ref[len(REF_PREFIX) :])
        record = _read_json(out / JOB_FILE)
        if not record or record.get("ref") != ref or "container_id" not in record:
            return None
        # The engine's labels are the truth about which container is this job's.
        found = await asyncio.to_thread(self._containers, str(out))
        if found and all(c.id != record["container_id"] for c in found):
            return None  # job.json is stale: another job owns this directory now
        handle = JobHandle(ref=ref, run_id=record.get("run_id", ""), output_dir=str(out))
        if self._alive(record):
            self._watch(handle, record)
        return handle

    async def find_jobs(self) -> list[JobHandle]:
        """Handles of every academyd container on the engine (running or not yet collected)."""
        handles = []
        for c in await asyncio.to_thread(self._containers, None):
            out = c.labels.get(LABEL_OUTPUT_DIR, "")
            handle = await self.reattach(REF_PREFIX + out)
            if handle is not None:
                handles.append(handle)
        return handles

    def _containers(self, output_dir: str | None) -> list[Container]:
        labels = [f"{LABEL_MANAGED}=true"]
        if output_dir is not None:
            labels.append(f"{LABEL_OUTPUT_DIR}={output_dir}")
        return list(self.client.containers.list(all=True, filters={"label": labels}))

    # ------------------------------------------------------------ observe

    def _container(self, record: dict[str, Any]) -> Container | None:
        try:
            return self.client.containers.get(record["container_id"])
        except NotFound:
            return None
        except DockerException as exc:
            raise HabitatError(f"the Docker engine does not answer about {record.get('container_name')}: "
                               f"{exc}; start dockerd (the job's files stay in its output directory)"
                               ) from None

    def _alive(self, record: dict[str, Any]) -> bool:
        out = Path(record["ref"][len(REF_PREFIX) :])
        if (out / EXIT_FILE).exists():
            return False  # the end is recorded (and the container maybe removed)
        container = self._container(record)
        if container is None:
            return False  # removed from outside before its end was recorded: lost
        if container.status in _LIVE_STATES:
            return True
        self._record_end(container, out)
        return False

    def _conclude(self, handle: JobHandle) -> tuple[JobStatus, dict[str, Any]]:
        status, info = super()._conclude(handle)
        if status is JobStatus.LOST:
            name = self._record(handle).get("container_name")
            info["reason"] = (f"the trainer container {name} is gone without an exit code: it was removed "
                              "from outside or the engine lost it; the same spec resumes from its checkpoint")
        return status, info

    def _record_end(self, container: Container, out: Path) -> None:
        """Copy what the container knows of its end into the output directory (exit_code last)."""
        state = container.attrs.get("State", {})
        for name, streams in ((STDOUT_FILE, {"stdout": True, "stderr": False}),
                              (STDERR_FILE, {"stdout": False, "stderr": True})):
            with open(out / name, "ab") as fh:
                fh.write(container.logs(**streams))
        if state.get("OOMKilled") and not (out / LIMIT_FILE).exists():
            record = _read_json(out / JOB_FILE) or {}
            _write_json(out / LIMIT_FILE, {"code": "memory_limit", "reason": (
                f"memory limit {record.get('docker_memory_limit_mb')} MB exceeded (the container was "
                "OOM-killed); raise training.memory_limit_mb or lower batch_size/max_length")})
        tmp = out / f".{EXIT_FILE}.tmp"
        tmp.write_text(f"{int(state.get('ExitCode', -1))}\n")
        os.replace(tmp, out / EXIT_FILE)

    # ------------------------------------------------------------ control

    async def _stop(self, record: dict[str, Any], grace_s: float) -> None:
        container = self._container(record)
        if container is not None:
            try:
                # docker stop: SIGTERM (the init passes it to the trainer), SIGKILL after the timeout.
                await asyncio.to_thread(container.stop, timeout=int(math.ceil(grace_s)))
            except NotFound:
                pass
        while self._alive(record):
            await asyncio.sleep(self.poll_s / 4)

    async def result(self, handle: JobHandle) -> JobResult:
        result = await super().result(handle)
        record = self._record(handle)
        container = self._container(record)
        if container is not None:  # the end is in the output directory now; the container can go
            await asyncio.to_thread(container.remove, force=True)
        return result

    async def close(self) -> None:
        await super().close()
        self.client.close()
