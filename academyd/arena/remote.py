"""The arena's measurement as a job for an `academyd worker` (arena.where = worker): the daemon's side.

`measure_on_worker` sends what a local measurement reads (the candidate's adapter, the champion's if any,
the held-out, checks and general sets) to the object store, publishes an evaluation job (EvalJob, kind
"evaluate") on the workers' queue (`academy.jobs.train.<any|gpu>.<job id>`, the GPU queue when the arena
or the workers require one), waits for its lease to end, and brings back the measurement and the arena
directory (the GGUF adapters the worker exported and measured in llama.cpp, probes.json) into `out_dir`,
their paths rewritten to this host's. The caller (academyd.arena.contest.evaluate) then judges it with
the same gate as a local measurement: the worker measures, the daemon decides (it is the trust boundary;
a worker's numbers are evidence, never a verdict).

The job's id is `<run_id>-arena-<digest of what is measured>`: a daemon restarted while a worker measures
finds the same job (and its result) instead of sending another; a worker lost mid-measurement is replaced
as for training (the lease's takeover), and a job neither queued nor finished is published again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog
from nats.js.errors import NotFoundError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_never, wait_fixed

from academyd.artifacts import ArtifactError, get_dir, get_file, put_dir, put_file, transient
from academyd.files import sha256_file
from academyd.settings import Settings
from academyd.worker.protocol import (
    ArtifactRef,
    EvalJob,
    Lease,
    Wire,
    WireError,
    artifact_name,
    job_subject,
)

log = structlog.get_logger("academyd.arena.remote")

INPUTS = ("candidate.tar", "champion.tar", "heldout.jsonl", "general.jsonl", "checks.jsonl")
LOST_AFTER_S = 30.0  # a job neither queued nor finished for this long is published again
QUEUE_LOOK_S = 5.0  # how often the queue is looked at while the lease is read every poll


def _digest(base_model: str, options: dict[str, Any], files: dict[str, str | None]) -> str:
    return hashlib.sha256(json.dumps({"base": base_model, "options": options, "files": files},
                                     sort_keys=True).encode()).hexdigest()


def _identity(candidate: Path, champion: Path | None, heldout: Path, general: Path,
              checks: Path | None) -> dict[str, str | None]:
    from academyd.registry import adapter_sha256

    return {"candidate": adapter_sha256(candidate), "champion": adapter_sha256(champion) if champion else None,
            "heldout": sha256_file(heldout), "general": sha256_file(general),
            "checks": sha256_file(checks) if checks else None}


def job_id_for(run_id: str | None, digest: str) -> str:
    return f"{(run_id or 'eval')[:90]}-arena-{digest[:16]}"


def map_paths(value: Any, old: str, new: str) -> Any:
    """`value` (the measurement) with every string under the worker's `old` directory moved to `new`."""
    if isinstance(value, str):
        return new + value[len(old):] if value == old or value.startswith(old + "/") else value
    if isinstance(value, list):
        return [map_paths(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: map_paths(v, old, new) for k, v in value.items()}
    return value


async def _retry(what: str, call: Any, poll_s: float) -> Any:
    """`call()` again while the cluster answers "not now" (a leader election, a reconnect): every `poll_s`,
    until it answers (a warning every 10 s at most); other errors at once."""
    said = 0.0

    def warn(state: RetryCallState) -> None:
        nonlocal said
        if time.monotonic() - said > 10:
            said = time.monotonic()
            exc = state.outcome.exception() if state.outcome else None
            log.warning("arena_job_unreadable", what=what, error=f"{type(exc).__name__}: {exc}")

    async for tried in AsyncRetrying(retry=retry_if_exception(transient), wait=wait_fixed(poll_s), stop=stop_never,
                                     before_sleep=warn, reraise=True):
        with tried:
            return await call()
    raise AssertionError("unreachable")  # AsyncRetrying returns or raises


async def _queued(js: Any, settings: Settings, job_id: str, requires_gpu: bool) -> bool:
    async def look() -> bool:
        try:
            await js.get_last_msg(settings.workers.jobs_stream, job_subject(job_id, requires_gpu))
            return True
        except NotFoundError:
            return False

    return bool(await _retry("queue", look, 0.5))


async def measure_on_worker(
    settings: Settings, nc: Any, *, run_id: str | None, base_model: str, candidate: Path, champion: Path | None,
    heldout: Path, general: Path, checks: Path | None, options: dict[str, Any], out_dir: Path,
    poll_s: float = 0.5,
) -> dict[str, Any]:
    """The measurement of `candidate` against `champion` (None: the base), made by a worker; its files in
    `out_dir`. `run_id` is the run's id (the job's is derived from it). ArenaError when it cannot be had."""
    from academyd.arena.contest import ArenaError

    js = nc.jetstream(timeout=10)
    wire = await _retry("streams", lambda: Wire.open(js, settings, create=True), poll_s)
    arena = settings.arena
    requires_gpu = bool(settings.workers.require_gpu if arena.require_gpu is None else arena.require_gpu)
    files = await asyncio.to_thread(_identity, candidate, champion, heldout, general, checks)
    jid = job_id_for(run_id, _digest(base_model, options, files))
    lease, _ = await _retry("lease", lambda: wire.lease(jid), poll_s)
    body: bytes | None = None

    async def dispatch() -> None:
        nonlocal body
        if body is None:
            inputs: dict[str, Any] = {}
            try:
                for what, path in (("candidate", candidate), ("champion", champion)):
                    if path is not None:
                        inputs[what] = ArtifactRef.of(await put_dir(wire.artifacts, artifact_name(jid, f"{what}.tar"),
                                                                    path, scratch=out_dir.parent))
                for what, path in (("heldout", heldout), ("general", general), ("checks", checks)):
                    if path is not None:
                        inputs[what] = ArtifactRef.of(await put_file(wire.artifacts,
                                                                     artifact_name(jid, f"{what}.jsonl"), path))
                body = EvalJob.build(kind="evaluate", run_id=jid, base_model=base_model, inputs=inputs,
                                     arena=options, requires_gpu=requires_gpu).encode()
            except (OSError, ArtifactError) as exc:
                raise ArenaError(f"cannot send the arena's inputs to the workers: {exc}") from None
            except WireError as exc:
                raise ArenaError(f"the evaluation job cannot be sent to workers: {exc.detail}") from None
        await _retry("publish", lambda: js.publish(job_subject(jid, requires_gpu), body,
                                                   headers={"Nats-Msg-Id": f"{jid}-{int(time.time())}"}), poll_s)
        log.info("arena_job_dispatched", job=jid, requires_gpu=requires_gpu, champion=files["champion"] is not None)

    if lease is None and not await _queued(js, settings, jid, requires_gpu):
        await dispatch()
    else:
        log.info("arena_job_found", job=jid, state=lease.state if lease else "queued")
    missing_since: float | None = None
    said = looked = 0.0
    while lease is None or not lease.final:
        await asyncio.sleep(poll_s)
        lease, _ = await _retry("lease", lambda: wire.lease(jid), poll_s)
        if lease is not None and lease.final:
            break
        if lease is None or lease.state == "released":
            if time.monotonic() - said > 60:
                said = time.monotonic()
                log.info("arena_job_waiting", job=jid, reason="no worker has taken it yet",
                         requires_gpu=requires_gpu)
        if time.monotonic() - looked < QUEUE_LOOK_S:
            continue
        looked = time.monotonic()
        if not await _queued(js, settings, jid, requires_gpu):
            missing_since = missing_since or time.monotonic()
            if time.monotonic() - missing_since > LOST_AFTER_S:  # refused, purged or lost: once more
                log.warning("arena_job_lost", job=jid)
                await dispatch()
                missing_since = None
        else:
            missing_since = None
    return await _collect(wire, jid, lease, out_dir)


async def _collect(wire: Wire, jid: str, lease: Lease, out_dir: Path) -> dict[str, Any]:
    from academyd.arena.contest import ArenaError

    ev = lease.evaluation
    if lease.state != "succeeded" or ev is None:
        raise ArenaError(f"the arena's measurement on worker {lease.worker or '(none)'} ended {lease.state}: "
                         f"{lease.reason or 'no reason given'}")
    try:
        # Read by the chunks the lease records (their nuid): an upload over the name changes nothing here.
        await get_dir(wire.artifacts, ev.arena_dir.name, out_dir, sha256=ev.arena_dir.sha256,
                      pinned=ev.arena_dir.artifact())
        with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".measure-") as tmp:
            path = Path(tmp) / "measure.json"
            await get_file(wire.artifacts, ev.measurement.name, path, sha256=ev.measurement.sha256,
                           pinned=ev.measurement.artifact())
            measurement = json.loads(path.read_text(encoding="utf-8"))
    except (ArtifactError, OSError, ValueError) as exc:
        raise ArenaError(f"the measurement of worker {lease.worker} is unusable: {exc}") from None
    if not isinstance(measurement, dict):
        raise ArenaError(f"the measurement of worker {lease.worker} is not a JSON object")
    measurement = map_paths(measurement, ev.out_dir.rstrip("/"), str(out_dir))
    measurement["measured_by"] = {"worker": lease.worker, "host": lease.host, "attempt": lease.attempt, "job": jid}
    # Its inputs served their purpose (the bucket's TTL is the backstop); its outputs stay until the TTL, so
    # that a daemon restarted before it recorded the verdict collects them again.
    for what in INPUTS:
        try:
            await wire.artifacts.obj.delete(artifact_name(jid, what))
        except NotFoundError:
            pass
        except Exception as exc:
            log.info("arena_job_cleanup_failed", job=jid, error=f"{type(exc).__name__}: {exc}")
            break
    log.info("arena_job_collected", job=jid, worker=lease.worker, attempt=lease.attempt)
    return measurement
