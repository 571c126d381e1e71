"""The worker: pull a job, hold its lease, run the trainer locally (the process habitat), send results back.

One job at a time. While it runs: an in-progress ack, a lease refresh (compare-and-swap) and an
advertisement every heartbeat; the trainer's events forwarded to `academy.jobs.events.<run_id>`; each
checkpoint uploaded and recorded in the lease. At the end: adapter, summary and loss log uploaded
(sha256 checked by the store against what was read), the lease set to its final state, then the job
acked. A worker that cannot refresh its lease for `stop_after_s` (cut off from NATS) or finds it taken
(fenced) kills its trainer and leaves the job to whoever holds it; SIGTERM stops the trainer (its
checkpoint is kept), gives the lease back and naks the job so another worker resumes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import structlog
from nats.js.errors import KeyWrongLastSequenceError
from pydantic import ValidationError

from academyd.artifacts import ArtifactError, ensure_bucket, get_dir, get_file, put_dir, put_file
from academyd.childenv import child_env
from academyd.habitat.base import HabitatError, JobStatus, TrainingJob
from academyd.habitat.process import ProcessHabitat, package_root
from academyd.settings import Settings
from academyd.trainer import spec as S
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
    Lease,
    SummaryInline,
    Timing,
    Wire,
    WireError,
    artifact_name,
    cancel_subject,
    clip,
    consumer_name,
    dead_letter_job,
    describe,
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


@dataclass
class _Holding:
    """The job in hand: its lease (as last written) and revision, and why it must stop, if it must."""

    run_id: str
    lease: Lease
    rev: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    lost: str | None = None  # fenced or cut off: the job is someone else's now
    stopped_logged: bool = False  # the heartbeat stopped the trainer and said so
    cancelled: bool = False  # the daemon asked
    stopping: bool = False  # this worker is shutting down


class Worker:
    def __init__(self, settings: Settings, *, work_dir: Path, worker_id: str | None = None,
                 models: dict[str, str] | None = None, gpu: str = "auto", cpu_threads: int | None = None,
                 trainer_python: Path | None = None) -> None:
        self.settings = settings
        self.work_dir = work_dir.resolve()
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
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
        self.holding: _Holding | None = None
        self.stop_event = asyncio.Event()
        self._handle: Any = None
        self._stopper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
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
            if self.holding is not None and self._handle is not None:
                self.holding.stopping = True
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
            job = JobMessage.decode(msg.data)
            job.check_subject(msg.subject)
        except WireError as exc:
            await self._reject(msg, exc)
            return
        run_id = job.run_id
        try:
            taken = await self._acquire(msg, run_id)
        except Exception as exc:  # the cluster cannot answer now: the job comes back after its ack wait
            log.warning("lease_unavailable", run_id=run_id, error=f"{type(exc).__name__}: {exc}")
            return
        if taken is None:
            return
        self.holding = taken
        try:
            await self._train(msg, job, taken)
        except (ArtifactError, HabitatError, S.SpecError, WireError, OSError) as exc:
            if taken.lost is None:
                await self._finish(msg, taken, "failed", reason=str(exc), error_code="worker")
        finally:
            self.holding = None
            self._handle = None

    async def _acquire(self, msg: Any, run_id: str) -> _Holding | None:
        """Take the lease, or leave the job alone (finished, or held by a worker that still refreshes)."""
        assert self.wire is not None
        while True:
            lease, rev = await self.wire.lease(run_id)
            if lease is not None and lease.final:
                log.info("job_already_finished", run_id=run_id, state=lease.state)
                await msg.ack()
                return None
            # An entry that is not a valid lease (lease None, rev > 0) is trusted for nothing (no attempt, no
            # checkpoint) but waited out as a holder would be: its writer may still be refreshing it.
            new = Lease.build(run_id=run_id, worker=self.id, host=socket.gethostname(), state="training",
                              attempt=(lease.attempt if lease else 0) + 1,
                              checkpoint=lease.checkpoint if lease else None)
            try:
                if rev == 0:
                    return _Holding(run_id, new, await self.wire.leases.create(run_id, new.encode()))
                if lease is None or lease.state != "released":
                    # Held: take it only after a full window of silence, so its holder has stopped by then.
                    holder = lease.worker if lease else "(not a valid lease)"
                    log.info("lease_wait", run_id=run_id, holder=holder, wait_s=self.timing.takeover_wait_s)
                    deadline = time.monotonic() + self.timing.takeover_wait_s
                    while time.monotonic() < deadline:
                        with contextlib.suppress(Exception):
                            await msg.in_progress()
                        await asyncio.sleep(min(self.timing.heartbeat_s / 2, max(0.0, deadline - time.monotonic())))
                        _, now_rev = await self.wire.lease(run_id)
                        if now_rev != rev:
                            break
                    if (await self.wire.lease(run_id))[1] != rev:
                        log.info("lease_alive", run_id=run_id, holder=holder)
                        await msg.nak(delay=self.settings.workers.ack_wait_s)
                        return None
                return _Holding(run_id, new, await self.wire.leases.update(run_id, new.encode(), last=rev))
            except KeyWrongLastSequenceError:
                continue  # someone else moved first: look again

    async def _refresh(self, h: _Holding, **changes: Any) -> bool:
        """Compare-and-swap the lease (a heartbeat, a checkpoint, the end); False once it is lost."""
        assert self.wire is not None
        async with h.lock:
            if h.lost is not None:
                return False
            value = h.lease.changed(**changes, beat=round(time.time(), 3))  # WireError: a bug here, not sent
            try:
                h.rev = await self.wire.leases.update(h.run_id, value.encode(), last=h.rev)
            except KeyWrongLastSequenceError:
                h.lost = "fenced: another worker holds the lease"
                return False
            h.lease = value
            return True

    def _local_spec(self, job: JobMessage, jobdir: Path, inputs: dict[str, Path]) -> S.TrainSpec:
        raw = dict(job.spec)
        raw.update(dataset_path=str(inputs["dataset"]), heldout_path=str(inputs["heldout"]) if "heldout" in inputs
                   else None, output_dir=str(jobdir), base_model=self.models.get(job.base_model, job.base_model))
        if self.cpu_threads:
            raw["cpu_threads"] = self.cpu_threads
        return S.TrainSpec.from_dict(raw)

    async def _train(self, msg: Any, job: JobMessage, h: _Holding) -> None:
        assert self.wire is not None
        run_id = h.run_id
        jobdir = self.work_dir / "jobs" / run_id  # run_id is one safe path component (JobMessage checks it)
        inputs: dict[str, Path] = {}
        for what, art in (("dataset", job.inputs.dataset), ("heldout", job.inputs.heldout)):
            if art is None:
                continue
            inputs[what] = jobdir / "inputs" / f"{what}.jsonl"
            await get_file(self.wire.artifacts, art.name, inputs[what], sha256=art.sha256)
        spec = self._local_spec(job, jobdir, inputs)
        resume_step = await self._restore_checkpoint(h, jobdir, spec)
        heart = asyncio.create_task(self._heartbeat(msg, h), name=f"heartbeat:{run_id}")
        async def on_cancel(cancel_msg: Any) -> None:
            try:
                ask = CancelMessage.decode(cancel_msg.data)
            except WireError as exc:
                log.warning("cancel_ignored", run_id=run_id, worker=self.id, reason=str(exc))
                return
            h.cancelled = True
            await self.habitat.cancel(handle, grace_s=ask.grace_s)

        cancel_sub = await self.nc.subscribe(cancel_subject(run_id), cb=on_cancel)
        handle = self._handle = await self.habitat.start(TrainingJob(spec=spec, run_id=run_id, time_limit_s=job.time_limit_s,
                                                                     memory_limit_mb=job.memory_limit_mb))
        log.info("trainer_started", run_id=run_id, worker=self.id, attempt=h.lease.attempt, resume_step=resume_step,
                 time=round(time.time(), 3))
        try:
            async for ev in self.habitat.progress(handle):
                if h.lost is not None:
                    continue
                await self._forward(h, ev)
                if ev.get("type") == S.EVENT_CHECKPOINT:
                    try:  # bounded: a store that stopped answering must not hold up the progress loop
                        await asyncio.wait_for(self._upload_checkpoint(h, jobdir, ev),
                                               timeout=self.settings.workers.ack_wait_s)
                    except asyncio.TimeoutError:
                        log.warning("checkpoint_upload_failed", run_id=run_id, step=ev.get("step"),
                                    error="timed out")
            result = await self.habitat.result(handle)
        finally:
            heart.cancel()
            with contextlib.suppress(BaseException):
                await heart
            with contextlib.suppress(Exception):
                await cancel_sub.unsubscribe()
        if not h.stopped_logged:
            log.info("trainer_stopped", run_id=run_id, worker=self.id, status=result.status.value,
                     lost=h.lost, time=round(time.time(), 3))
        if h.lost is not None:
            log.warning("job_lost", run_id=run_id, worker=self.id, reason=h.lost)
            return  # not ours any more: no ack, no nak; the holder finishes it
        if h.stopping and result.status is not JobStatus.SUCCEEDED:
            if await self._refresh(h, state="released"):
                with contextlib.suppress(Exception):
                    await msg.nak()
            log.info("job_released", run_id=run_id, worker=self.id)
            return
        if result.status is JobStatus.SUCCEEDED:
            await self._send_results(msg, h, job, jobdir)
        elif h.cancelled or result.status is JobStatus.CANCELLED:
            await self._finish(msg, h, "cancelled", reason="cancelled by the daemon", error_code="cancelled")
        else:
            await self._finish(msg, h, "failed", reason=result.reason, error_code=result.error_code,
                               exit_code=result.exit_code)

    async def _heartbeat(self, msg: Any, h: _Holding) -> None:
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(self.timing.heartbeat_s if time.monotonic() - last_ok < self.timing.heartbeat_s * 1.5
                                else self.timing.heartbeat_s / 4)
            with contextlib.suppress(Exception):
                await msg.in_progress()
            try:
                ok = await self._refresh(h)
            except Exception as exc:  # timeout, disconnected: the lease may run out
                ok = None
                log.debug("lease_refresh_failed", run_id=h.run_id, error=type(exc).__name__)
            if ok:
                last_ok = time.monotonic()
                log.info("heartbeat", run_id=h.run_id, worker=self.id, rev=h.rev, time=round(time.time(), 3))
                continue
            if ok is False or time.monotonic() - last_ok > self.timing.stop_after_s:
                if h.lost is None:
                    h.lost = f"cut off from NATS for {time.monotonic() - last_ok:.1f} s (lease not refreshed)"
                log.warning("trainer_stopping", run_id=h.run_id, worker=self.id, reason=h.lost, time=round(time.time(), 3))
                await self.habitat.cancel(self._handle, grace_s=self.timing.heartbeat_s / 4)
                # cancel() returns once the trainer's process group is gone: say so now, not when the progress
                # loop gets round to it (it may be waiting on an upload to the unreachable store).
                h.stopped_logged = True
                log.info("trainer_stopped", run_id=h.run_id, worker=self.id, status="cancelled", lost=h.lost,
                         time=round(time.time(), 3))
                return

    async def _forward(self, h: _Holding, ev: dict[str, Any]) -> None:
        try:
            body = ForwardedEvent.build(run_id=h.run_id, worker=self.id, attempt=h.lease.attempt, event=ev).encode()
        except WireError as exc:  # not sent: the daemon would drop it anyway
            log.warning("event_not_forwarded", run_id=h.run_id, worker=self.id, type=ev.get("type"), reason=str(exc))
            return
        with contextlib.suppress(Exception):
            await self.js.publish(events_subject(h.run_id), body)

    async def _restore_checkpoint(self, h: _Holding, jobdir: Path, spec: S.TrainSpec) -> int | None:
        """The lease's checkpoint, downloaded and re-marked for this host's spec (its local paths)."""
        assert self.wire is not None
        ckpt = h.lease.checkpoint
        if ckpt is None:
            return None
        art, step = ckpt.artifact, ckpt.step
        ckpt_root = jobdir / S.CHECKPOINTS_DIR
        if ckpt_root.exists():
            shutil.rmtree(ckpt_root)  # only the lease's checkpoint counts: anything here may be a fenced attempt's
        dest = ckpt_root / f"checkpoint-{step}"
        await get_dir(self.wire.artifacts, art.name, dest, sha256=art.sha256)
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

    async def _upload_checkpoint(self, h: _Holding, jobdir: Path, ev: dict[str, Any]) -> None:
        assert self.wire is not None
        step = int(ev.get("step") or 0)
        path = Path(str(ev.get("path")))
        name = artifact_name(h.run_id, f"ckpt/{step:08d}-a{h.lease.attempt}.tar")
        try:
            art = await put_dir(self.wire.artifacts, name, path, scratch=jobdir)
        except (OSError, ArtifactError) as exc:  # rotated away meanwhile, or the store is unreachable
            log.warning("checkpoint_upload_failed", run_id=h.run_id, step=step, error=str(exc))
            return
        except Exception as exc:
            log.warning("checkpoint_upload_failed", run_id=h.run_id, step=step, error=f"{type(exc).__name__}: {exc}")
            return
        with contextlib.suppress(Exception):
            if await self._refresh(h, checkpoint=Checkpoint(step=step, artifact=ArtifactRef.of(art), worker=self.id)):
                log.info("checkpoint_uploaded", run_id=h.run_id, worker=self.id, step=step, sha256=art.sha256,
                         time=round(time.time(), 3))

    async def _send_results(self, msg: Any, h: _Holding, job: JobMessage, jobdir: Path) -> None:
        from academyd.registry import adapter_sha256

        assert self.wire is not None
        adapter = jobdir / S.ADAPTER_DIR
        cfg = adapter / "adapter_config.json"
        if cfg.is_file():  # the adapter names the base model as the daemon does, not by this host's path
            data = json.loads(cfg.read_text())
            data["base_model_name_or_path"] = job.base_model
            cfg.write_text(json.dumps(data, indent=2, sort_keys=True))
        sha = await asyncio.to_thread(adapter_sha256, adapter)
        arts = self.wire.artifacts
        adapter_art = await put_dir(arts, artifact_name(h.run_id, "adapter.tar"), adapter, scratch=jobdir)
        summary_art = await put_file(arts, artifact_name(h.run_id, "summary.json"), jobdir / S.SUMMARY_FILE)
        loss_art = None
        if (jobdir / S.LOSS_FILE).exists():
            loss_art = await put_file(arts, artifact_name(h.run_id, "loss.jsonl"), jobdir / S.LOSS_FILE)
        summary = json.loads((jobdir / S.SUMMARY_FILE).read_text())
        try:
            result = JobOutcome(
                adapter=ArtifactRef.of(adapter_art), adapter_sha256=sha, summary=ArtifactRef.of(summary_art),
                loss=ArtifactRef.of(loss_art) if loss_art else None,
                summary_inline=SummaryInline(**{k: summary.get(k) for k in SummaryInline.model_fields}))
        except ValidationError as exc:  # the trainer's summary is not what the wire says: the run fails, said so
            raise WireError("unsendable", f"the result of {h.run_id} does not fit the lease: {describe(exc)}") from None
        await self._finish(msg, h, "succeeded", result=result)
        log.info("job_succeeded", run_id=h.run_id, worker=self.id, adapter_sha256=sha)

    async def _finish(self, msg: Any, h: _Holding, state: str, **fields: Any) -> None:
        """Record the end in the lease (the fence decides), then ack: after this the job is done."""
        if "reason" in fields:
            fields["reason"] = clip(fields["reason"])
        if fields.get("error_code") is not None:
            fields["error_code"] = str(fields["error_code"])[:100]
        for _ in range(20):
            try:
                ok = await self._refresh(h, state=state, **fields)
                break
            except KeyWrongLastSequenceError:
                ok = False
                break
            except WireError as exc:  # a bug on this side: record that much rather than leave the job to loop
                log.error("job_result_unsendable", run_id=h.run_id, worker=self.id, state=state, reason=str(exc))
                if state == "failed":
                    return
                await self._finish(msg, h, "failed", reason=f"the worker could not record its {state} result: "
                                   f"{exc.detail}", error_code="worker")
                return
            except Exception:
                await asyncio.sleep(self.timing.heartbeat_s / 4)
        else:
            ok = False
        if not ok:
            log.warning("job_result_not_recorded", run_id=h.run_id, worker=self.id, reason=h.lost or "unreachable")
            return
        await self._forward(h, {"type": S.EVENT_DONE if state == "succeeded" else S.EVENT_ERROR,
                                "time": round(time.time(), 3), "state": state, "reason": fields.get("reason")})
        for _ in range(10):
            try:
                await msg.ack_sync(timeout=self.timing.heartbeat_s)
                break
            except Exception:
                await asyncio.sleep(0.5)
        log.info("job_acked", run_id=h.run_id, worker=self.id, state=state)
