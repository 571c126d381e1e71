"""An evaluation job on a worker (arena.where = worker): the arena's measurement, under the job's lease.

The same lease as a training job's (academyd.worker.lease.HeldLease: heartbeat, fence, takeover), the same
object store: the candidate's adapter (and the champion's, when there is one), the held-out, checks and
general sets come in; `academyd.arena.measure` runs in this host's trainer environment with the options the
daemon sent (academyd.arena.contest.measure_args: the command line a local measurement gets), and dies
with this worker (ACADEMY_TRAINER_PARENT); the measurement JSON and the arena directory (the GGUF adapters
it exported and measured in llama.cpp, probes.json) go back and are recorded in the lease's `evaluation`.
The verdict is not made here: the daemon's gate decides on the measurement, as for a local one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from academyd.arena.contest import ArenaError, measure_args, run_trainer_module
from academyd.artifacts import ArtifactError, get_dir, get_file, put_dir, put_file
from academyd.habitat.base import HabitatError
from academyd.trainer._process import PARENT_ENV, process_start
from academyd.worker.lease import HeldLease
from academyd.worker.protocol import ArtifactRef, EvalJob, EvalOutcome, WireError, artifact_name

if TYPE_CHECKING:
    from academyd.worker.run import Worker

log = structlog.get_logger("academyd.worker")

MEASURE_FILE = "measure.json"
ARENA_TAR = "arena.tar"


async def run_evaluation(worker: Worker, h: HeldLease, job: EvalJob) -> None:
    """Everything this worker does for one evaluation job: inputs in, the measurement, results out."""
    jobdir = worker.work_dir / "jobs" / h.run_id  # one safe path component (EvalJob checks it)
    arts = worker.wire_artifacts
    try:
        inputs = jobdir / "inputs"
        out_dir = jobdir / "arena"
        for stale in (inputs, out_dir):  # an earlier attempt's files here are not this attempt's
            await asyncio.to_thread(shutil.rmtree, stale, True)
        paths: dict[str, Path] = {}
        for what in ("candidate", "champion"):
            art = getattr(job.inputs, what)
            if art is not None:
                paths[what] = inputs / what
                await worker._slow_link("get", art.name)
                await get_dir(arts, art.name, paths[what], sha256=art.sha256, retry_s=None, pinned=art.artifact())
        for what in ("heldout", "general", "checks"):
            art = getattr(job.inputs, what)
            if art is not None:
                paths[what] = inputs / f"{what}.jsonl"
                await worker._slow_link("get", art.name)
                await get_file(arts, art.name, paths[what], sha256=art.sha256, retry_s=None, pinned=art.artifact())
        base = worker.models.get(job.base_model, job.base_model)
        args = measure_args(job.arena.model_dump(), base=base, candidate=paths["candidate"],
                            champion=paths.get("champion"), heldout=paths["heldout"], general=paths["general"],
                            checks=paths.get("checks"), out_dir=out_dir)
        if worker.cpu_threads and not job.arena.cpu_threads:
            args += ["--cpu-threads", str(worker.cpu_threads)]
        measurement = await _measure(worker, h, args, job.arena.time_limit_s)
        if measurement is None:  # this worker is stopping: the lease went back, another worker measures
            return
        (jobdir / MEASURE_FILE).write_text(json.dumps(measurement))
        # Named per worker and attempt (as a training job's results): a fenced attempt overwrites nothing.
        mine = f"{worker.id}-a{h.lease.attempt}"
        name = artifact_name(h.run_id, f"{mine}/{MEASURE_FILE}")
        await worker._slow_link("put", name)
        measured = await put_file(arts, name, jobdir / MEASURE_FILE, retry_s=None)
        name = artifact_name(h.run_id, f"{mine}/{ARENA_TAR}")
        await worker._slow_link("put", name)
        arena_dir = await put_dir(arts, name, out_dir, scratch=jobdir, retry_s=None)
        outcome = EvalOutcome(measurement=ArtifactRef.of(measured), arena_dir=ArtifactRef.of(arena_dir),
                              out_dir=str(out_dir))
        if await worker._finish(h, "succeeded", evaluation=outcome):
            log.info("evaluation_succeeded", run_id=h.run_id, worker=worker.id, measurement=measured.sha256)
    except ArenaError as exc:
        await worker._finish(h, "failed", reason=str(exc), error_code="arena")
    except (ArtifactError, HabitatError, WireError, OSError, KeyError) as exc:
        await worker._finish(h, "failed", reason=f"{type(exc).__name__}: {exc}", error_code="worker")


async def _measure(worker: Worker, h: HeldLease, args: list[str], time_limit_s: float) -> dict | None:
    """The measurement in the trainer environment (its own process group, ended with this task or this
    worker). None when the worker stops meanwhile: the measurement is ended and the lease given back."""
    me = os.getpid()
    task = asyncio.create_task(run_trainer_module(
        worker.settings, "academyd.arena.measure", args, time_limit_s=time_limit_s, what="the arena's measurement",
        python=worker.habitat.trainer_python, env={PARENT_ENV: f"{me}:{process_start(me)}"}), name="measure")
    h.trainer_running = True
    log.info("measurement_started", run_id=h.run_id, worker=worker.id, attempt=h.lease.attempt,
             time=round(time.time(), 3))
    try:
        while not task.done():
            if h.stopping:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                await h.release()
                return None
            await asyncio.wait({task}, timeout=0.5)
        return task.result()
    finally:  # the lease lost (this task cancelled): the measurement's process group is ended with it
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        h.trainer_running = False
        log.info("measurement_stopped", run_id=h.run_id, worker=worker.id, time=round(time.time(), 3))
