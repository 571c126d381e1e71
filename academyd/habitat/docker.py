"""The Docker habitat: the trainer in a container, on a Docker engine reached through the `docker` SDK.

The container
- runs `<python> -m academyd.trainer <job_dir>/spec.json` from a configurable image (the Unsloth image in
  production), with Docker's init as PID 1 so that `docker stop`'s SIGTERM reaches the trainer (which saves
  nothing more and exits 5), then SIGKILL after the grace period;
- has no network (`network_mode="none"`): the trainer is offline by design and a dataset cannot leak;
- runs as a non-root uid:gid with a read-only root filesystem, every capability dropped, no-new-privileges,
  and a tmpfs `/tmp` as HOME;
- sees what it needs at the host's own paths (`mount_plan`): its output directory writable (the only
  writable mount); its spec (a single file), the dataset, the held-out set, a base model given as a path,
  the `academyd` package and configured extra mounts read-only;
- gets a memory limit (no swap beyond it; by default 3/4 of the engine's memory), a CPU limit (by default
  all of the engine's CPUs but one), a pids limit, bounded logs, and every GPU when the engine has the
  NVIDIA runtime;
- is known by the engine's labels (`academyd.managed`, `academyd.run_id`, `academyd.job_dir`,
  `academyd.spec_hash`), by which a restarted daemon finds it (`reattach`, `find_jobs`): never by a file.

The job's directory is `academyd.habitat.jobdir`'s: the daemon's control directory (spec.json, job.json,
exit_code, cancelled, limit.json, trainer.stdout/.stderr) with the container's `output/` inside it. The
container cannot write its own bookkeeping: the exit code and the logs come from the engine when the
container ends (an OOM kill becomes limit.json). The daemon reads the output as untrusted: events,
summary, adapter and loss log without following symlinks, size-limited and validated; on success it copies
the adapter, summary and loss log into `result/`, which is what the registry reads. A planted link fails
the job with a reason that names it. The progress stream and the conclusion are ProcessHabitat's.

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
from docker.types import DeviceRequest, LogConfig
from docker.types import Mount as DockerMount

from academyd.files import atomic_write_text
from academyd.habitat import jobdir
from academyd.habitat.base import HabitatError, JobHandle, JobResult, JobStatus, TrainingJob
from academyd.habitat.jobdir import JobDir, UnsafeOutput
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
LABEL_JOB_DIR = "academyd.job_dir"
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
    memory_mb: int = 0  # the container's memory when the job sets none; 0: 3/4 of the engine's memory


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
    """Runs the trainer in a container. Same interface as ProcessHabitat; the layout of the job's
    directory is `academyd.habitat.jobdir`'s (a daemon-owned control directory, a writable output mount).

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
        if not t.docker_image:
            raise HabitatError("the Docker habitat needs an image: set training.docker_image "
                               "(ACADEMY_TRAINING__DOCKER_IMAGE) to repo@sha256:<digest>")
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
                memory_mb=t.docker_memory_mb,
            ),
        )

    # ------------------------------------------------------------ start / reattach

    async def start(self, job: TrainingJob) -> JobHandle:
        uid, gid = parse_user(self.options.user)
        jd = JobDir(Path(job.spec.output_dir).resolve())  # the pipeline's output_dir: the control directory
        ref = REF_PREFIX + str(jd.root)
        try:
            await asyncio.to_thread(self.client.images.get, self.options.image)
        except ImageNotFound:
            raise HabitatError(f"the Docker image {self.options.image} is not on the engine; build or load "
                               "it there (`docker build` / `docker load`; this habitat never pulls), or fix "
                               "training.docker_image") from None
        spec = self._absolute(job.spec.replace(output_dir=str(jd.output)))
        job = TrainingJob(spec=spec, run_id=job.run_id, time_limit_s=job.time_limit_s,
                          memory_limit_mb=job.memory_limit_mb, env=job.env)
        for old in await asyncio.to_thread(self._containers, str(jd.root)):
            if (old.labels.get(LABEL_RUN_ID) == job.run_id
                    and old.labels.get(LABEL_SPEC_HASH) == S.spec_hash(spec)
                    and _read_json(jd / JOB_FILE)):
                # This very job, started by a daemon that died before it recorded the ref: adopt it.
                return self._adopt(ref, job.run_id, self._record_for(jd), jd.root)
            if old.status in _LIVE_STATES:
                raise HabitatError(f"a trainer container ({old.name}) already runs in {jd.root}; cancel it "
                                   "or give the job another output_dir")
            # An earlier attempt whose result nobody collected: its end is in the files already, or lost.
            await asyncio.to_thread(old.remove, force=True)
        await asyncio.to_thread(self._prepare, jd, spec, uid, gid)
        inputs = [p for p in (spec.dataset_path, spec.heldout_path, spec.base_model) if p and os.path.isabs(p)]
        blocked = await asyncio.to_thread(unreadable, inputs, uid, gid)
        if blocked:
            raise HabitatError(f"the trainer container runs as {uid}:{gid} and cannot read "
                               f"{', '.join(blocked)}; "
                               "make the inputs readable (chmod -R a+rX) or set training.docker_user")
        try:
            info = await asyncio.to_thread(self.client.info)
            gpu = has_nvidia(info)
            limited = TrainingJob(spec=spec, run_id=job.run_id, time_limit_s=job.time_limit_s,
                                  memory_limit_mb=job.memory_limit_mb or self._default_memory_mb(info),
                                  env=job.env)
            # Docker refuses more CPUs than the engine has: a setting made for a bigger host is capped.
            cpus = min(self.options.cpus or default_cpus(info), float(info.get("NCPU") or 1))
            options = replace_options(self.options, cpus=cpus)
            missing = [p for p in inputs if not os.path.exists(p)]
            config = container_config(limited, options, gpu=gpu, job_dir=str(jd.root), missing=missing)
            offset = _events_size(jd)
            record = {
                "ref": ref,
                "run_id": job.run_id,
                "container_name": config["name"],
                "image": self.options.image,
                "gpu": gpu,
                "started_at": self._clock(),
                "events_offset": offset,
                "pid": None,
                "time_limit_s": job.time_limit_s,
                "memory_limit_mb": None,  # Docker enforces it (an OOM kill shows in the container's state)
                "docker_memory_limit_mb": limited.memory_limit_mb or None,
                "docker_cpus": options.cpus or None,
                "spec_hash": S.spec_hash(spec),
            }
            _write_json(jd / JOB_FILE, record)  # before create: a daemon that dies next still knows the job
            container = await asyncio.to_thread(lambda: self.client.containers.create(**config))
        except DockerException as exc:
            raise HabitatError(f"the Docker engine refused the trainer container: {exc}") from None
        try:
            await asyncio.to_thread(container.start)
        except DockerException as exc:
            await asyncio.to_thread(container.remove, force=True)
            raise HabitatError(f"the trainer container did not start: {exc}") from None
        await asyncio.to_thread(container.reload)
        record["pid"] = container.attrs.get("State", {}).get("Pid")  # on the engine's host; for messages
        _write_json(jd / JOB_FILE, record)
        log.info("docker_job_started", run_id=job.run_id, container=config["name"], image=self.options.image,
                 gpu=gpu, job_dir=str(jd.root))
        handle = JobHandle(ref=ref, run_id=job.run_id, output_dir=str(jd.root))
        self._watch(handle, record)
        return handle

    def _record_for(self, jd: JobDir) -> dict[str, Any]:
        record = _read_json(jd / JOB_FILE)
        assert isinstance(record, dict)
        return record

    def _default_memory_mb(self, info: dict[str, Any]) -> int | None:
        if self.options.memory_mb:
            return self.options.memory_mb
        return default_memory_mb(info)

    @staticmethod
    def _prepare(jd: JobDir, spec: S.TrainSpec, uid: int, gid: int) -> None:
        """The control directory (the daemon's, not the container's) and the container's output mount."""
        jd.root.mkdir(parents=True, exist_ok=True)
        if jd.root.is_symlink() or jd.output.is_symlink():
            raise HabitatError(f"{jd.root} or its output/ is a symlink; the job directory must be real")
        for name in (EXIT_FILE, CANCEL_FILE, LIMIT_FILE):
            (jd / name).unlink(missing_ok=True)
        _write_json(jd / S.SPEC_FILE, spec.to_dict())
        os.chmod(jd / S.SPEC_FILE, 0o644)  # the container's user reads it (through its single-file mount)
        jd.output.mkdir(exist_ok=True)
        DockerHabitat._give_output_dir(jd.output, uid, gid)

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
        jd = JobDir(Path(ref[len(REF_PREFIX) :]))
        record = _read_json(jd / JOB_FILE)
        if not isinstance(record, dict) or record.get("ref") != ref:
            return None
        # The engine's labels are the truth about which container is this job's.
        found = await asyncio.to_thread(self._containers, str(jd.root))
        if found and all(c.labels.get(LABEL_RUN_ID) != record.get("run_id") for c in found):
            return None  # job.json is stale: another job owns this directory now
        handle = JobHandle(ref=ref, run_id=str(record.get("run_id", "")), output_dir=str(jd.root))
        if self._alive(record):
            self._watch(handle, record)
        return handle

    async def find_jobs(self) -> list[JobHandle]:
        """Handles of every academyd container on the engine (running or not yet collected)."""
        handles = []
        for c in await asyncio.to_thread(self._containers, None):
            handle = await self.reattach(REF_PREFIX + c.labels.get(LABEL_JOB_DIR, ""))
            if handle is not None:
                handles.append(handle)
        return handles

    def _containers(self, job_dir: str | None) -> list[Container]:
        labels = [f"{LABEL_MANAGED}=true"]
        if job_dir is not None:
            labels.append(f"{LABEL_JOB_DIR}={job_dir}")
        return list(self.client.containers.list(all=True, filters={"label": labels}))

    # ------------------------------------------------------------ observe

    def _container(self, record: dict[str, Any]) -> Container | None:
        """The job's container as the engine knows it: by its labels (job directory and run id)."""
        root = record["ref"][len(REF_PREFIX) :]
        try:
            found = [c for c in self._containers(root) if c.labels.get(LABEL_RUN_ID) == record.get("run_id")]
        except DockerException as exc:
            raise HabitatError(f"the Docker engine does not answer about {record.get('container_name')}: "
                               f"{exc}; start dockerd (the job's files stay in its directory)") from None
        return found[0] if found else None

    def _alive(self, record: dict[str, Any]) -> bool:
        jd = JobDir(Path(record["ref"][len(REF_PREFIX) :]))
        if (jd / EXIT_FILE).exists():
            return False  # the end is recorded (and the container maybe removed)
        container = self._container(record)
        if container is None:
            return False  # removed from outside before its end was recorded: lost
        if container.status in _LIVE_STATES:
            return True
        self._record_end(container, jd)
        return False

    def _events_since(self, handle: JobHandle, offset: int) -> tuple[list[dict[str, Any]], int]:
        """Events from the container's output, read as untrusted (see jobdir); a planted link ends the job."""
        jd = JobDir(Path(handle.output_dir))
        try:
            data, _ = jobdir.read_from(jd.output, S.EVENTS_FILE, offset)
        except UnsafeOutput as exc:
            self._refuse(handle, exc)
            return [], offset
        events, used = jobdir.parse_events(data)
        return events, offset + used

    def _refuse(self, handle: JobHandle, exc: UnsafeOutput) -> None:
        """Fail the job for what its container planted: the reason in limit.json, the container killed."""
        jd = JobDir(Path(handle.output_dir))
        if not (jd / LIMIT_FILE).exists():
            _write_json(jd / LIMIT_FILE, {"code": exc.code, "reason": str(exc)})
            log.warning("docker_job_refused", run_id=handle.run_id, reason=str(exc))
        container = self._container(self._record(handle))
        if container is not None and container.status in _LIVE_STATES:
            with contextlib.suppress(DockerException):
                container.kill()

    async def _collect(self, handle: JobHandle) -> tuple[dict[str, Any] | None, str]:
        jd = JobDir(Path(handle.output_dir))
        try:
            return await asyncio.to_thread(collect_result, jd)
        except UnsafeOutput as exc:
            log.warning("docker_job_refused", run_id=handle.run_id, reason=str(exc))
            raise

    def _conclude(self, handle: JobHandle) -> tuple[JobStatus, dict[str, Any]]:
        status, info = super()._conclude(handle)
        if status is JobStatus.LOST:
            name = self._record(handle).get("container_name")
            info["reason"] = (f"the trainer container {name} is gone without an exit code: it was removed "
                              "from outside or the engine lost it; the same spec resumes from its checkpoint")
        return status, info

    def _record_end(self, container: Container, jd: JobDir) -> None:
        """Copy what the engine knows of the container's end into the control directory (exit_code last)."""
        state = container.attrs.get("State", {})
        for name, streams in ((STDOUT_FILE, {"stdout": True, "stderr": False}),
                              (STDERR_FILE, {"stdout": False, "stderr": True})):
            with open(jd / name, "ab") as fh:
                fh.write(container.logs(**streams))
        if state.get("OOMKilled") and not (jd / LIMIT_FILE).exists():
            record = _read_json(jd / JOB_FILE) or {}
            _write_json(jd / LIMIT_FILE, {"code": "memory_limit", "reason": (
                f"memory limit {record.get('docker_memory_limit_mb')} MB exceeded (the container was "
                "OOM-killed); raise training.memory_limit_mb or lower batch_size/max_length")})
        atomic_write_text(jd / EXIT_FILE, f"{int(state.get('ExitCode', -1))}\n")

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
        container = self._container(self._record(handle))
        if container is not None:  # the end is in the control directory now; the container can go
            await asyncio.to_thread(container.remove, force=True)
        return result

    async def close(self) -> None:
        await super().close()
        self.client.close()


def _events_size(jd: JobDir) -> int:
    """Where this attempt's events begin: the size of the output's events.jsonl now (0 if none)."""
    try:
        return jobdir.read_from(jd.output, S.EVENTS_FILE, 0, max_bytes=0)[1]
    except UnsafeOutput:
        return 0


def collect_result(jd: JobDir) -> tuple[dict[str, Any], str]:
    """The summary, the adapter and the loss log of a succeeded job, copied out of its output (read as
    untrusted) into the daemon's `result/`; returns (summary, adapter directory the daemon reads)."""
    summary = jobdir.read_json_object(jd.output, S.SUMMARY_FILE)
    if summary is None:
        raise UnsafeOutput(f"the trainer reported success but {jd.output / S.SUMMARY_FILE} does not exist")
    for key in ("steps", "final_loss", "base_heldout_loss", "adapter_heldout_loss"):
        value = summary.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UnsafeOutput(f"refused {jd.output / S.SUMMARY_FILE}: {key} is not a number")
    jd.result.mkdir(exist_ok=True)
    jobdir.copy_tree(jd.output, S.ADAPTER_DIR, jd.result / S.ADAPTER_DIR)
    loss = jobdir.read_bytes(jd.output, S.LOSS_FILE, max_bytes=256 << 20)
    if loss is not None:
        (jd.result / S.LOSS_FILE).write_bytes(loss)
    _write_json(jd.result / S.SUMMARY_FILE, summary)
    return summary, str(jd.result / S.ADAPTER_DIR)


def default_cpus(info: dict[str, Any]) -> float:
    """All of the engine's CPUs but one (at least one), so the host keeps a core for the daemon."""
    return float(max(1, int(info.get("NCPU") or 1) - 1))


def default_memory_mb(info: dict[str, Any]) -> int | None:
    """Three quarters of the engine's memory, so an oversized job is OOM-killed, not the host."""
    total = int(info.get("MemTotal") or 0)
    return int(total * 0.75) // 2**20 or None


def replace_options(options: DockerOptions, **changes: Any) -> DockerOptions:
    from dataclasses import replace

    return replace(options, **changes)
