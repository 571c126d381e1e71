"""The Docker habitat itself: the job-directory watcher (academyd.habitat.jobdir.JobWatcher: progress
stream, conclusion, cancel, watchdog) over a `ContainerRunner`, the trainer in a container. `start` builds
the container (`container`), prepares the host's side (`host`) and records the job before creating it;
`reattach` / `find_jobs` find a restarted daemon's containers by the engine's labels (`engine`); the
output is read back as untrusted (`readback`)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import docker
import structlog
from docker.errors import DockerException, ImageNotFound, NotFound

from academyd.childenv import child_env
from academyd.habitat.base import HabitatError, JobHandle, TrainingJob
from academyd.habitat.docker import host
from academyd.habitat.docker.container import (
    LABEL_JOB_DIR,
    LABEL_RUN_ID,
    LABEL_SPEC_HASH,
    DockerOptions,
    Mount,
    container_config,
    default_cpus,
    default_memory_mb,
    default_user,
    has_nvidia,
    parse_user,
    replace_options,
)
from academyd.habitat.docker.engine import LIVE_STATES, connect, managed_containers, record_end
from academyd.habitat.docker.readback import collect_result, events_size
from academyd.habitat.jobdir import (
    EXIT_FILE,
    JOB_FILE,
    LIMIT_FILE,
    JobDir,
    JobWatcher,
    UnsafeOutput,
    read_control,
    write_control,
)
from academyd.trainer import spec as S

if TYPE_CHECKING:
    from docker.models.containers import Container

    from academyd.settings import Settings

log = structlog.get_logger("academyd.habitat.docker")

REF_PREFIX = "docker:"
# Dequantizing a GGUF base on the host: 22 s for SmolLM2-135M on 2 cores; a 7B base takes minutes.
DEQUANTIZE_TIMEOUT_S = 1800


class ContainerRunner:
    """The trainer in a container; the layout of the job's directory is `academyd.habitat.jobdir`'s (a
    daemon-owned control directory, a writable output mount). Docker enforces the memory limit.

    Every engine call runs in a worker thread, never on the event loop: the state reads behind `status`,
    the progress stream and the watchdog too (each polls ~4 times a second, and a slow or hung engine
    would otherwise freeze ingest, acks and the systemd watchdog for up to the client's timeout). Reads of
    one job's state that overlap share one engine call (`is_alive`).
    """

    def __init__(self, client: docker.DockerClient, options: DockerOptions, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.options = options
        self._clock = clock
        self._state_reads: dict[str, asyncio.Future[bool]] = {}  # ref -> the engine call in flight

    async def _base_cache(self, base_model: str, uid: int, gid: int) -> tuple[tuple[Mount, ...], dict[str, str]]:
        """The container's view of a GGUF base's dequantized directory: (read-only mounts, environment).

        transformers trains on the dequantized fp32 form of a GGUF (academyd.trainer.base). Made inside the
        container it lands in the container's /tmp, a tmpfs: about 540 MB of SmolLM2-135M counted against the
        container's memory limit, and 25 s more, on every run. So it is made once on the host (the host's
        trainer interpreter, if it has one) and mounted read-only at its own path, with the replay answers
        already made for it; the trainer finds it through ACADEMY_BASE_CACHE. Without it (no host trainer,
        a directory the container's user cannot read) the container dequantizes as before, and a line says so.
        """
        from academyd.basemodel import BASE_IDENTITY_FILE, base_cache, cached_sha256, dequantized_dir

        base = Path(base_model)
        if not (base.is_absolute() and base.suffix == ".gguf" and await asyncio.to_thread(base.is_file)):
            return (), {}
        sha = await asyncio.to_thread(cached_sha256, base)
        cache = base_cache().resolve()
        target = dequantized_dir(sha, cache)
        if not (target / BASE_IDENTITY_FILE).is_file() and self.options.host_trainer_python:
            await self._dequantize_on_host(base)
        why = None
        if not (target / BASE_IDENTITY_FILE).is_file():
            why = "not dequantized on the host" + ("" if self.options.host_trainer_python else " (no host trainer)")
        elif await asyncio.to_thread(host.unreadable, [str(target)], uid, gid):
            why = f"the container's user {uid}:{gid} cannot read it"
        if why is not None:
            log.warning("base_cache_not_mounted", base=str(base), cache=str(target), reason=why,
                        note="the container dequantizes the GGUF in its own /tmp, in its memory")
            return (), {}
        replays = [str(p) for p in sorted(cache.glob("replay-*.jsonl"))]
        blocked = set(await asyncio.to_thread(host.unreadable, replays, uid, gid)) if replays else set()
        mounts = (Mount(str(target), str(target)), *(Mount(p, p) for p in replays if p not in blocked))
        return mounts, {"ACADEMY_BASE_CACHE": str(cache)}

    async def _dequantize_on_host(self, base: Path) -> None:
        assert self.options.host_trainer_python is not None
        env = child_env(pythonpath=self.options.source_dir)
        t0 = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                self.options.host_trainer_python, "-m", "academyd.trainer.base", str(base), env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            log.warning("base_dequantize_failed", base=str(base), error=f"{type(exc).__name__}: {exc}")
            return
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout=DEQUANTIZE_TIMEOUT_S)
        except (TimeoutError, asyncio.CancelledError) as exc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # never left behind: a daemon stopping, or a dequantize that hangs
            await proc.wait()
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.warning("base_dequantize_failed", base=str(base), error=f"not done in {DEQUANTIZE_TIMEOUT_S} s")
            return
        if proc.returncode != 0:
            lines = (out or b"").decode(errors="replace").strip().splitlines()
            log.warning("base_dequantize_failed", base=str(base), exit_code=proc.returncode,
                        error=(lines[-1] if lines else (err or b"").decode(errors="replace")[-500:]))
            return
        log.info("base_dequantized", base=str(base), seconds=round(time.monotonic() - t0, 1))

    # ------------------------------------------------------------ start / reattach

    async def start(self, job: TrainingJob) -> tuple[JobHandle, dict[str, Any]]:
        uid, gid = parse_user(self.options.user)
        jd = JobDir(Path(job.spec.output_dir).resolve())  # the pipeline's output_dir: the control directory
        ref = REF_PREFIX + str(jd.root)
        try:
            await asyncio.to_thread(self.client.images.get, self.options.image)
        except ImageNotFound:
            raise HabitatError(f"the Docker image {self.options.image} is not on the engine; build or load "
                               "it there (`docker build` / `docker load`; this habitat never pulls), or fix "
                               "training.docker_image") from None
        spec = host.absolute(job.spec.replace(output_dir=str(jd.output)))
        job = TrainingJob(spec=spec, run_id=job.run_id, time_limit_s=job.time_limit_s,
                          memory_limit_mb=job.memory_limit_mb, env=job.env)
        for old in await asyncio.to_thread(self._containers, str(jd.root)):
            if (old.labels.get(LABEL_RUN_ID) == job.run_id
                    and old.labels.get(LABEL_SPEC_HASH) == S.spec_hash(spec)
                    and isinstance(previous := read_control(jd / JOB_FILE), dict)):
                # This very job, started by a daemon that died before it recorded the ref: adopt it.
                log.warning("job_adopted", run_id=job.run_id, ref=ref, pid=previous.get("pid"),
                            reason="a job of this run was already running (the daemon died before it "
                                   "recorded the ref)")
                return JobHandle(ref=ref, run_id=job.run_id, output_dir=str(jd.root)), previous
            if old.status in LIVE_STATES:
                raise HabitatError(f"a trainer container ({old.name}) already runs in {jd.root}; cancel it "
                                   "or give the job another output_dir")
            # An earlier attempt whose result nobody collected: its end is in the files already, or lost.
            await asyncio.to_thread(old.remove, force=True)
        await asyncio.to_thread(host.prepare, jd, spec, uid, gid)
        inputs = [p for p in (spec.dataset_path, spec.heldout_path, spec.base_model) if p and os.path.isabs(p)]
        blocked = await asyncio.to_thread(host.unreadable, inputs, uid, gid)
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
            cache_mounts, cache_env = await self._base_cache(spec.base_model, uid, gid)
            if cache_mounts:
                options = replace_options(options, mounts=(*options.mounts, *cache_mounts))
                limited = TrainingJob(spec=spec, run_id=job.run_id, time_limit_s=job.time_limit_s,
                                      memory_limit_mb=limited.memory_limit_mb, env={**job.env, **cache_env})
            config = container_config(limited, options, gpu=gpu, job_dir=str(jd.root), missing=missing)
            offset = events_size(jd)
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
            write_control(jd / JOB_FILE, record)  # before create: a daemon that dies next still knows the job
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
        write_control(jd / JOB_FILE, record)
        log.info("docker_job_started", run_id=job.run_id, container=config["name"], image=self.options.image,
                 gpu=gpu, job_dir=str(jd.root))
        return JobHandle(ref=ref, run_id=job.run_id, output_dir=str(jd.root)), record

    def _default_memory_mb(self, info: dict[str, Any]) -> int | None:
        if self.options.memory_mb:
            return self.options.memory_mb
        return default_memory_mb(info)

    async def reattach(self, ref: str) -> tuple[JobHandle, dict[str, Any]] | None:
        if not ref.startswith(REF_PREFIX):
            return None
        jd = JobDir(Path(ref[len(REF_PREFIX) :]))
        record = read_control(jd / JOB_FILE)
        if not isinstance(record, dict) or record.get("ref") != ref:
            return None
        # The engine's labels are the truth about which container is this job's.
        found = await asyncio.to_thread(self._containers, str(jd.root))
        if found and all(c.labels.get(LABEL_RUN_ID) != record.get("run_id") for c in found):
            return None  # job.json is stale: another job owns this directory now
        return JobHandle(ref=ref, run_id=str(record.get("run_id", "")), output_dir=str(jd.root)), record

    def _containers(self, job_dir: str | None) -> list[Container]:
        return managed_containers(self.client, job_dir)

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

    async def is_alive(self, record: dict[str, Any]) -> bool:
        ref = record["ref"]
        read = self._state_reads.get(ref)
        if read is None:
            read = asyncio.ensure_future(asyncio.to_thread(self._alive, record))
            self._state_reads[ref] = read
            read.add_done_callback(lambda _: self._state_reads.pop(ref, None))
        return await asyncio.shield(read)

    def _alive(self, record: dict[str, Any]) -> bool:
        jd = JobDir(Path(record["ref"][len(REF_PREFIX) :]))
        if (jd / EXIT_FILE).exists():
            return False  # the end is recorded (and the container maybe removed)
        container = self._container(record)
        if container is None:
            return False  # removed from outside before its end was recorded: lost
        if container.status in LIVE_STATES:
            return True
        record_end(container, jd)
        return False

    def rss_bytes(self, record: dict[str, Any]) -> int | None:
        return None  # Docker enforces the memory limit (an OOM kill shows in the container's state)

    def events_dir(self, handle: JobHandle) -> Path:
        return JobDir(Path(handle.output_dir)).output  # read as untrusted; a planted link ends the job

    def refuse(self, handle: JobHandle, exc: UnsafeOutput) -> None:
        """Fail the job for what its container planted: the reason in limit.json, the container killed."""
        jd = JobDir(Path(handle.output_dir))
        if not (jd / LIMIT_FILE).exists():
            write_control(jd / LIMIT_FILE, {"code": exc.code, "reason": str(exc)})
            log.warning("docker_job_refused", run_id=handle.run_id, reason=str(exc))
        record = read_control(jd / JOB_FILE)
        if not isinstance(record, dict) or not record.get("ref"):
            return

        def kill() -> None:
            with contextlib.suppress(DockerException, HabitatError):
                container = self._container(record)
                if container is not None and container.status in LIVE_STATES:
                    container.kill()

        try:  # called from the progress stream (the loop) or from `_conclude` (a worker thread)
            asyncio.get_running_loop().run_in_executor(None, kill)
        except RuntimeError:
            kill()

    async def collect(self, handle: JobHandle) -> tuple[dict[str, Any] | None, str]:
        jd = JobDir(Path(handle.output_dir))
        try:
            return await asyncio.to_thread(collect_result, jd)
        except UnsafeOutput as exc:
            log.warning("docker_job_refused", run_id=handle.run_id, reason=str(exc))
            raise

    def lost_reason(self, record: dict[str, Any]) -> str:
        return (f"the trainer container {record.get('container_name')} is gone without an exit code: it was "
                "removed from outside or the engine lost it; the same spec resumes from its checkpoint")

    # ------------------------------------------------------------ control

    async def stop(self, record: dict[str, Any], grace_s: float) -> None:
        container = await asyncio.to_thread(self._container, record)
        if container is not None:
            try:
                # docker stop: SIGTERM (the init passes it to the trainer), SIGKILL after the timeout.
                await asyncio.to_thread(container.stop, timeout=int(math.ceil(grace_s)))
            except NotFound:
                pass

    async def release(self, handle: JobHandle) -> None:
        record = read_control(JobDir(Path(handle.output_dir)) / JOB_FILE) or {}
        container = await asyncio.to_thread(self._container, record) if record.get("ref") else None
        if container is not None:  # the end is in the control directory now; the container can go
            await asyncio.to_thread(container.remove, force=True)

    async def close(self) -> None:
        self.client.close()


class DockerHabitat(JobWatcher):
    """Runs the trainer in a container: the job-directory watcher over a `ContainerRunner`."""

    name = "docker"

    def __init__(self, client: docker.DockerClient, options: DockerOptions, *, poll_s: float = 0.25,
                 clock: Callable[[], float] = time.time) -> None:
        self.runner: ContainerRunner = ContainerRunner(client, options, clock=clock)
        super().__init__(self.runner, poll_s=poll_s, clock=clock)
        self.client, self.options = client, options

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
                host_trainer_python=_host_trainer_python(t.trainer_python),
            ),
        )

    async def find_jobs(self) -> list[JobHandle]:
        """Handles of every academyd container on the engine (running or not yet collected)."""
        handles = []
        for c in await asyncio.to_thread(self.runner._containers, None):
            handle = await self.reattach(REF_PREFIX + c.labels.get(LABEL_JOB_DIR, ""))
            if handle is not None:
                handles.append(handle)
        return handles


def _host_trainer_python(configured: Path | None) -> str | None:
    """The host's trainer interpreter (training.trainer_python, else the project's .venv-trainer), if any."""
    from academyd.habitat.process import default_trainer_python

    py = configured or default_trainer_python()
    return str(py) if py.is_file() else None
