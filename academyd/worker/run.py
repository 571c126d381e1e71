"""The worker: pull a job, hold its lease, run the trainer locally (the process habitat), send results back.

One job at a time, held from acquire to ack by its lease (academyd.worker.lease.HeldLease): an in-progress
ack and a lease refresh (compare-and-swap) every heartbeat, through the downloads (inputs, the checkpoint
to resume from), the trainer, the uploads and the result record alike. Transfers retry transient JetStream
errors for as long as the lease holds. The trainer's events are forwarded to `academy.jobs.events.<run_id>.<id>`;
each checkpoint is uploaded beside the trainer and recorded in the lease. At the end: adapter, summary and
loss log uploaded (sha256 checked by the store against what was read), the lease set to its final state,
then the job acked. A worker that cannot refresh its lease for `stop_after_s` (cut off from NATS) or finds
it taken (fenced) stops everything it does for the job, its trainer first, and leaves the job to whoever
holds it; SIGTERM stops the trainer (its checkpoint is kept), gives the lease back and naks the job so
another worker resumes at once.

The trainer dies with the worker: it watches the worker's pid (ACADEMY_TRAINER_PARENT) and ends its own
process group when the worker is gone, SIGKILL included. A restarted worker ends any trainer a previous
one left (`end_leftover_trainers`) before it takes work.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import structlog
from pydantic import ValidationError

from academyd.artifacts import ArtifactError, ensure_bucket, get_dir, get_file, put_dir, put_file
from academyd.childenv import child_env
from academyd.events import describe
from academyd.habitat.base import HabitatError, JobResult, JobStatus, TrainingJob
from academyd.habitat.process import JOB_FILE, ProcessHabitat, _proc_stat, package_root
from academyd.settings import Settings
from academyd.trainer import spec as S
from academyd.trainer._process import PARENT_ENV, process_start
from academyd.worker.evaluate import run_evaluation
from academyd.worker.lease import HeldLease, LeaseLost
from academyd.worker.trust import worker_identity
from academyd.worker.protocol import (
    WORKER_ID_PATTERN,
    WORKER_ID_RE,
    Advertisement,
    ArtifactRef,
    CancelMessage,
    Checkpoint,
    ForwardedEvent,
    JobMessage,
    JobOutcome,
    SummaryInline,
    Timing,
    Wire,
    WireError,
    artifact_name,
    cancel_subject,
    consumer_name,
    EvalJob,
    dead_letter_job,
    decode_job,
    events_subject,
)

log = structlog.get_logger("academyd.worker")

CHECKPOINT_MARKER = "academy_checkpoint.json"  # written by the trainer in each complete checkpoint

PROBE = r"""
import json, platform, os
d = {"python": platform.python_version(), "cuda": False, "gpu": None}
try:
    import torch
    d["torch"] = torch.__version__
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        d["cuda"] = True
        d["gpu"] = {"name": p.name, "memory_mb": p.total_memory // 2**20, "count": torch.cuda.device_count()}
except Exception as e:
    d["error"] = f"{type(e).__name__}: {e}"
for m in ("transformers", "peft", "trl"):
    try:
        d[m] = __import__(m).__version__
    except Exception:
        pass
print(json.dumps(d))
"""


def probe_capabilities(trainer_python: Path, *, gpu: str = "auto", timeout_s: float = 180.0) -> dict[str, Any]:
    """What this host offers, asked of the trainer environment itself (torch's view of the GPU)."""
    env = child_env(pythonpath=str(package_root()))
    if gpu == "none":
        env["CUDA_VISIBLE_DEVICES"] = ""
    try:
        proc = subprocess.run([str(trainer_python), "-c", PROBE], capture_output=True, text=True, env=env,
                              timeout=timeout_s, check=False)
        found = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        raise HabitatError(f"the trainer environment {trainer_python} does not answer ({exc}); run "
                           "`make trainer-env` or pass --trainer-python") from None
    if not found:
        raise HabitatError(f"the trainer environment {trainer_python} failed its probe: {proc.stderr[-500:]}")
    trainer = {k: found[k] for k in ("python", "torch", "transformers", "peft", "trl") if k in found}
    return {"gpu": found.get("gpu") if gpu != "none" else None, "cpu_threads": os.cpu_count() or 1,
            "trainer": trainer}


class Worker:
    def __init__(self, settings: Settings, *, work_dir: Path, worker_id: str | None = None,
                 models: dict[str, str] | None = None, gpu: str = "auto", cpu_threads: int | None = None,
                 trainer_python: Path | None = None) -> None:
        self.settings = settings
        self.work_dir = work_dir.resolve()
        self.id, nats_cfg = worker_identity(settings, worker_id)  # bound to its NATS identity, if it has one
        self.settings = settings = settings.model_copy(update={"nats": nats_cfg})
        if WORKER_ID_RE.fullmatch(self.id) is None:
            raise HabitatError(f"worker id {self.id!r} is not usable (it is a key in the workers bucket): give "
                               f"--id matching {WORKER_ID_PATTERN}")
        self.models = dict(models or {})
        self.gpu_mode = gpu
        self.cpu_threads = cpu_threads
        self.habitat = ProcessHabitat(trainer_python or settings.training.trainer_python)
        self.timing = Timing(settings.workers.ack_wait_s)
        self.caps: dict[str, Any] = {}
        self.nc: Any = None
        self.js: Any = None
        self.wire: Wire | None = None
        self.holding: HeldLease | None = None
        self.stop_event = asyncio.Event()
        self._handle: Any = None
        self._stopper: asyncio.Task[None] | None = None
        self.leftover_trainers: list[int] = []

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # Before anything else: a trainer an earlier worker here left running would train a job twice.
        self.leftover_trainers = await asyncio.to_thread(end_leftover_trainers, self.work_dir)
        log.info("leftover_trainers", worker=self.id, ended=self.leftover_trainers)
        self.caps = await asyncio.to_thread(probe_capabilities, self.habitat.trainer_python, gpu=self.gpu_mode)
        try:
            self._advertisement()
        except WireError as exc:
            raise HabitatError(f"this host's capabilities cannot be advertised: {exc.detail}") from None
        await self._connect()
        if self.wire is None:  # stopped while waiting for the streams
            await self.nc.close()
            return
        caps = ["gpu", "any"] if self.caps.get("gpu") else ["any"]
        js_jobs = self.nc.jetstream(timeout=10)
        subs = [await js_jobs.pull_subscribe_bind(durable=consumer_name(c), stream=self.settings.workers.jobs_stream)
                for c in caps]
        advertiser = asyncio.create_task(self._advertise(), name="advertise")
        log.info("worker_ready", worker=self.id, capabilities=caps, gpu=self.caps.get("gpu"),
                 trainer=self.caps.get("trainer"), servers=self.settings.nats.servers)
        try:
            while not self.stop_event.is_set():
                msg = await self._next(subs)
                if msg is not None:
                    await self._run_job(msg)
        finally:
            advertiser.cancel()
            with contextlib.suppress(BaseException):
                await advertiser
            with contextlib.suppress(Exception):
                await self.wire.workers.delete(self.id)
            with contextlib.suppress(Exception):
                await self.nc.close()
            log.info("worker_stopped", worker=self.id)

    def request_stop(self, why: str = "requested") -> None:
        if not self.stop_event.is_set():
            log.info("worker_stopping", worker=self.id, why=why)
            self.stop_event.set()
            if self.holding is not None:
                self.holding.stopping = True
            if self.holding is not None and self._handle is not None:
                # The trainer stops at once (SIGTERM: it keeps its last checkpoint); the lease goes back.
                self._stopper = asyncio.get_running_loop().create_task(self.habitat.cancel(self._handle, grace_s=10.0))

    async def _connect(self) -> None:
        from academyd.bus import connect_options

        n = self.settings.nats
        if not n.servers:
            raise HabitatError("a worker needs the daemon's NATS: pass --nats-url (one URL or a cluster's, "
                               "comma-separated) or set ACADEMY_NATS__URL")

        async def on_disconnect() -> None:
            log.warning("nats_disconnected", worker=self.id)

        async def on_reconnect() -> None:
            log.info("nats_reconnected", worker=self.id, url=str(self.nc.connected_url.netloc))

        async def on_error(exc: Exception) -> None:
            log.debug("nats_error", worker=self.id, error=str(exc))

        opts = connect_options(n, n.url or "")
        opts.update(name=f"academyd-worker-{self.id}", disconnected_cb=on_disconnect, reconnected_cb=on_reconnect,
                    error_cb=on_error, reconnect_time_wait=0.5)
        try:
            self.nc = await asyncio.wait_for(nats.connect(**opts), 30)
        except Exception as exc:
            raise HabitatError(f"cannot connect to NATS at {n.url}: {type(exc).__name__}: {exc}; check --nats-url "
                               "and the credentials (nats.user/password, token, creds_file)") from None
        # Short request timeout: a lease refresh on a dead connection must fail within the heartbeat.
        try:
            await Wire.open(self.nc.jetstream(timeout=10), self.settings, create=True)
        except Exception as exc:  # a least-privilege worker may not create: the daemon does
            log.info("worker_binds_only", reason=f"{type(exc).__name__}: {exc}")
        # Lease refreshes, in-progress acks and events with a request timeout of one heartbeat: a refresh on a
        # dead connection fails well within the stop window. Artifacts (many chunk publishes, R3) get longer.
        self.js = self.nc.jetstream(timeout=max(0.5, self.timing.heartbeat_s))
        while not self.stop_event.is_set():
            try:
                self.wire = await Wire.open(self.js, self.settings, create=False)
                self.wire.artifacts = await ensure_bucket(self.nc.jetstream(timeout=30), self.settings.workers.artifacts_bucket)
                return
            except Exception as exc:
                log.warning("worker_waits_for_streams", reason=f"{type(exc).__name__}: {exc}", hint=(
                    "the daemon creates the jobs stream and the buckets at its first job; start it, or give "
                    "this worker the permissions to create them"))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), 5)

    def _advertisement(self) -> bytes:
        return Advertisement.build(worker=self.id, host=socket.gethostname(), platform=platform.platform(),
                                   **self.caps, job=self.holding.run_id if self.holding else None,
                                   at=round(time.time(), 3)).encode()

    async def _advertise(self) -> None:
        assert self.wire is not None
        while True:
            with contextlib.suppress(Exception):
                await self.wire.workers.put(self.id, self._advertisement())
            await asyncio.sleep(self.timing.heartbeat_s)

    async def _next(self, subs: list[Any]) -> Any:
        for sub in subs:  # the GPU queue first: a GPU worker serves those who need it before anyone else
            try:
                msgs = await sub.fetch(1, timeout=0.5 if len(subs) > 1 else 1.0)
            except nats.errors.TimeoutError:
                continue
            except Exception as exc:
                log.debug("fetch_failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)
                continue
            if msgs:
                return msgs[0]
        return None

    # ------------------------------------------------------------ one job

    async def _reject(self, msg: Any, error: WireError) -> None:
        """A job message that is not one: terminated (never redelivered), dead-lettered, the worker goes on."""
        kept = await dead_letter_job(self.js, msg, error)
        log.warning("job_rejected", worker=self.id, subject=msg.subject, code=error.code, reason=error.detail,
                    bytes=len(msg.data or b""), dead_lettered=kept)
        with contextlib.suppress(Exception):
            await msg.term()


    async def _run_job(self, msg: Any) -> None:
        try:
            job = decode_job(msg.data)
            job.check_subject(msg.subject)
        except WireError as exc:
            await self._reject(msg, exc)
            return
        assert self.wire is not None
        try:
            h = await HeldLease.acquire(self.wire, msg, job.run_id, self.id, self.timing,
                                        nak_delay_s=self.settings.workers.ack_wait_s)
        except Exception as exc:  # the cluster cannot answer now: the job comes back after its ack wait
            log.warning("lease_unavailable", run_id=job.run_id, error=f"{type(exc).__name__}: {exc}")
            return
        if h is None:
            return
        self.holding = h
        try:
            # from here to the ack, under the lease's heartbeat
            await h.hold(run_evaluation(self, h, job) if isinstance(job, EvalJob) else self._job(h, job))
        except LeaseLost as exc:
            log.warning("job_lost", run_id=h.run_id, worker=self.id, reason=str(exc))
        finally:
            self.holding = None

    async def _job(self, h: HeldLease, job: JobMessage) -> None:
        """Everything this worker does for one job: inputs and checkpoint in, the trainer, results out."""
        jobdir = self.work_dir / "jobs" / h.run_id  # run_id is one safe path component (JobMessage checks it)
        try:
            inputs: dict[str, Path] = {}
            for what, art in (("dataset", job.inputs.dataset), ("heldout", job.inputs.heldout)):
                if art is not None:
                    inputs[what] = jobdir / "inputs" / f"{what}.jsonl"
                    await self._slow_link("get", art.name)
                    await get_file(self.wire_artifacts, art.name, inputs[what], sha256=art.sha256, retry_s=None,
                                   pinned=art.artifact())
            spec = self._local_spec(job, jobdir, inputs)
            resume_step = await self._restore_checkpoint(h, jobdir, spec)
            if h.stopping:
                await h.release()
                return
            result = await self._run_trainer(h, job, jobdir, spec, resume_step)
            if result is None:
                return
            if result.status is JobStatus.SUCCEEDED:
                await self._send_results(h, job, jobdir)
            elif h.cancelled or result.status is JobStatus.CANCELLED:
                await self._finish(h, "cancelled", reason="cancelled by the daemon", error_code="cancelled")
            else:
                await self._finish(h, "failed", reason=result.reason, error_code=result.error_code,
                                   exit_code=result.exit_code)
        except (ArtifactError, HabitatError, S.SpecError, WireError, OSError) as exc:
            await self._finish(h, "failed", reason=str(exc), error_code="worker")

    def _local_spec(self, job: JobMessage, jobdir: Path, inputs: dict[str, Path]) -> S.TrainSpec:
        raw = dict(job.spec)
        raw.update(dataset_path=str(inputs["dataset"]), heldout_path=str(inputs["heldout"]) if "heldout" in inputs
                   else None, output_dir=str(jobdir), base_model=self.models.get(job.base_model, job.base_model))
        if self.cpu_threads:
            raw["cpu_threads"] = self.cpu_threads
        return S.TrainSpec.from_dict(raw)

    @property
    def wire_artifacts(self) -> Any:
        assert self.wire is not None
        return self.wire.artifacts

    async def _slow_link(self, kind: str, name: str) -> None:
        """`workers.slow_transfers` (tests): this transfer takes that much longer, as on a slow link."""
        for pattern, seconds in self.settings.workers.slow_transfers.items():
            if fnmatch.fnmatchcase(f"{kind}:{name}", pattern):
                log.info("transfer_slowed", kind=kind, name=name, seconds=seconds, time=round(time.time(), 3))
                await asyncio.sleep(seconds)

    async def _run_trainer(self, h: HeldLease, job: JobMessage, jobdir: Path, spec: S.TrainSpec,
                           resume_step: int | None) -> JobResult | None:
        """The trainer, from start to result, its checkpoints uploaded beside it. None: the lease was
        given back (this worker stops). Cancelled (the lease lost): the trainer is ended before this returns."""
        run_id = h.run_id
        handle: Any = None

        async def on_cancel(cancel_msg: Any) -> None:
            try:
                ask = CancelMessage.decode(cancel_msg.data)
            except WireError as exc:
                log.warning("cancel_ignored", run_id=run_id, worker=self.id, reason=str(exc))
                return
            h.cancelled = True
            if handle is not None:
                await self.habitat.cancel(handle, grace_s=ask.grace_s)

        cancel_sub = await self.nc.subscribe(cancel_subject(run_id), cb=on_cancel)
        uploads = _CheckpointUploads(lambda ev: self._upload_checkpoint(h, jobdir, ev))
        me = os.getpid()
        try:
            handle = self._handle = await self.habitat.start(TrainingJob(
                spec=spec, run_id=run_id, time_limit_s=job.time_limit_s, memory_limit_mb=job.memory_limit_mb,
                env={PARENT_ENV: f"{me}:{process_start(me)}"}))  # the trainer dies with this worker
            h.trainer_running = True
            log.info("trainer_started", run_id=run_id, worker=self.id, attempt=h.lease.attempt,
                     resume_step=resume_step, pid=_trainer_pid(jobdir), time=round(time.time(), 3))
            async for ev in self.habitat.progress(handle):
                await self._forward(h, ev)
                if ev.get("type") == S.EVENT_CHECKPOINT:
                    uploads.offer(ev)
            result = await self.habitat.result(handle)
            h.trainer_running = False
            log.info("trainer_stopped", run_id=run_id, worker=self.id, status=result.status.value,
                     time=round(time.time(), 3))
            if result.status is not JobStatus.SUCCEEDED:
                await uploads.drain(self.settings.workers.ack_wait_s)  # the newest checkpoint is what resumes
                if h.stopping:
                    await h.release()
                    return None
            return result
        except asyncio.CancelledError:
            # The lease is lost (or the worker is shutting down): the trainer must not outlive this.
            if handle is not None and h.trainer_running:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.habitat.cancel(handle, grace_s=self.timing.heartbeat_s / 4))
                log.info("trainer_stopped", run_id=run_id, worker=self.id, status="cancelled", lost=h.lost,
                         time=round(time.time(), 3))
            raise
        finally:
            h.trainer_running = False
            self._handle = None
            uploads.cancel()
            with contextlib.suppress(Exception):
                await cancel_sub.unsubscribe()

    async def _forward(self, h: HeldLease, ev: dict[str, Any]) -> None:
        try:
            body = ForwardedEvent.build(run_id=h.run_id, worker=self.id, attempt=h.lease.attempt, event=ev).encode()
        except WireError as exc:  # not sent: the daemon would drop it anyway
            log.warning("event_not_forwarded", run_id=h.run_id, worker=self.id, type=ev.get("type"), reason=str(exc))
            return
        with contextlib.suppress(Exception):
            await self.js.publish(events_subject(h.run_id, self.id), body)

    async def _restore_checkpoint(self, h: HeldLease, jobdir: Path, spec: S.TrainSpec) -> int | None:
        """The lease's checkpoint, downloaded and re-marked for this host's spec (its local paths)."""
        ckpt = h.lease.checkpoint
        if ckpt is None:
            return None
        art, step = ckpt.artifact, ckpt.step
        ckpt_root = jobdir / S.CHECKPOINTS_DIR
        if ckpt_root.exists():
            shutil.rmtree(ckpt_root)  # only the lease's checkpoint counts: anything here may be a fenced attempt's
        dest = ckpt_root / f"checkpoint-{step}"
        await self._slow_link("get", art.name)
        await get_dir(self.wire_artifacts, art.name, dest, sha256=art.sha256, retry_s=None, pinned=art.artifact())
        marker = dest / CHECKPOINT_MARKER
        data = json.loads(marker.read_text())
        data["spec_hash"] = S.spec_hash(spec)
        marker.write_text(json.dumps(data))
        for stale in ("summary.json", S.ADAPTER_DIR):
            p = jobdir / stale
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        log.info("checkpoint_restored", run_id=h.run_id, worker=self.id, step=step)
        return step

    async def _upload_checkpoint(self, h: HeldLease, jobdir: Path, ev: dict[str, Any]) -> None:
        step = int(ev.get("step") or 0)
        path = Path(str(ev.get("path")))
        name = artifact_name(h.run_id, f"ckpt/{step:08d}-{self.id}-a{h.lease.attempt}.tar")  # unique: no overwrite
        try:
            await self._slow_link("put", name)
            art = await put_dir(self.wire_artifacts, name, path, scratch=jobdir, retry_s=None)
        except (OSError, ArtifactError) as exc:  # rotated away meanwhile
            log.warning("checkpoint_upload_failed", run_id=h.run_id, step=step, error=str(exc))
            return
        except Exception as exc:
            log.warning("checkpoint_upload_failed", run_id=h.run_id, step=step, error=f"{type(exc).__name__}: {exc}")
            return
        with contextlib.suppress(Exception):
            if await h.refresh(checkpoint=Checkpoint(step=step, artifact=ArtifactRef.of(art), worker=self.id)):
                log.info("checkpoint_uploaded", run_id=h.run_id, worker=self.id, step=step, sha256=art.sha256,
                         time=round(time.time(), 3))

    async def _send_results(self, h: HeldLease, job: JobMessage, jobdir: Path) -> None:
        from academyd.registry import adapter_sha256

        adapter = jobdir / S.ADAPTER_DIR
        cfg = adapter / "adapter_config.json"
        if cfg.is_file():  # the adapter names the base model as the daemon does, not by this host's path
            data = json.loads(cfg.read_text())
            data["base_model_name_or_path"] = job.base_model
            cfg.write_text(json.dumps(data, indent=2, sort_keys=True))
        sha = await asyncio.to_thread(adapter_sha256, adapter)
        arts = self.wire_artifacts
        uploaded: dict[str, Any] = {}
        for what, path in (("adapter.tar", adapter), ("summary.json", jobdir / S.SUMMARY_FILE),
                           ("loss.jsonl", jobdir / S.LOSS_FILE)):
            if what == "loss.jsonl" and not path.exists():
                continue
            name = artifact_name(h.run_id, f"{self.id}-a{h.lease.attempt}/{what}")  # unique: no overwrite
            await self._slow_link("put", name)
            put = put_dir(arts, name, path, scratch=jobdir, retry_s=None) if path.is_dir() else \
                put_file(arts, name, path, retry_s=None)
            uploaded[what] = ArtifactRef.of(await put)
        summary = json.loads((jobdir / S.SUMMARY_FILE).read_text())
        try:
            result = JobOutcome(
                adapter=uploaded["adapter.tar"], adapter_sha256=sha, summary=uploaded["summary.json"],
                loss=uploaded.get("loss.jsonl"),
                summary_inline=SummaryInline(**{k: summary.get(k) for k in SummaryInline.model_fields}))
        except ValidationError as exc:  # the trainer's summary is not what the wire says: the run fails, said so
            raise WireError("unsendable", f"the result of {h.run_id} does not fit the lease: {describe(exc)}") from None
        if await self._finish(h, "succeeded", result=result):
            log.info("job_succeeded", run_id=h.run_id, worker=self.id, adapter_sha256=sha)

    async def _finish(self, h: HeldLease, state: str, **fields: Any) -> bool:
        """The end recorded in the lease, announced (a done or error event), then the job acked."""
        try:
            if not await h.finish(state, **fields):
                return False
        except WireError as exc:  # a bug on this side: record that much rather than leave the job to loop
            log.error("job_result_unsendable", run_id=h.run_id, worker=self.id, state=state, reason=str(exc))
            if state == "failed":
                return False
            return await self._finish(h, "failed", reason=f"the worker could not record its {state} result: "
                                      f"{exc.detail}", error_code="worker")
        await self._forward(h, {"type": S.EVENT_DONE if state == "succeeded" else S.EVENT_ERROR,
                                "time": round(time.time(), 3), "state": state, "reason": fields.get("reason")})
        await h.ack(state)
        return True


class _CheckpointUploads:
    """Checkpoints uploaded one at a time beside the trainer (a slow upload holds up neither the trainer's
    events nor the heartbeat); while one uploads, only the newest that arrives meanwhile waits."""

    def __init__(self, upload: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self._upload = upload
        self._next: dict[str, Any] | None = None
        self._busy = False
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="checkpoint-uploads")

    def offer(self, ev: dict[str, Any]) -> None:
        self._next = ev
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            ev, self._next = self._next, None
            if ev is not None:
                self._busy = True
                try:
                    await self._upload(ev)
                finally:
                    self._busy = False

    async def drain(self, timeout_s: float) -> None:
        """Until what was offered is uploaded (at most `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while (self._next is not None or self._busy) and time.monotonic() < deadline and not self._task.done():
            await asyncio.sleep(0.1)

    def cancel(self) -> None:
        self._task.cancel()


def _trainer_pid(jobdir: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return int(json.loads((jobdir / JOB_FILE).read_text())["pid"])
    return None


def end_leftover_trainers(work_dir: Path) -> list[int]:
    """Trainers that an earlier worker process on this host left running (SIGKILLed before they noticed),
    found by the pid each job directory records and checked against /proc (same start time, a trainer's
    command line), then ended with their process group. What was ended (pids): this runs before any work."""
    ended: list[int] = []
    for record in sorted((work_dir / "jobs").glob(f"*/{JOB_FILE}")):
        try:
            data = json.loads(record.read_text())
            pid, started = int(data["pid"]), data.get("proc_start")
        except (OSError, ValueError, KeyError, TypeError):
            continue
        stat = _proc_stat(pid)
        if stat is None or stat[0] == "Z" or stat[2] != started:
            continue  # gone, or the pid now belongs to another process
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"academyd.trainer" not in cmdline:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stat[1], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (now := _proc_stat(pid)) is not None and now[0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        log.warning("leftover_trainer_ended", run_id=record.parent.name, pid=pid, pgid=stat[1])
        ended.append(pid)
    return ended
