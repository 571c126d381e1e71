"""The `nats` habitat: training jobs run on `academyd worker` processes, over NATS only (no shared path).

`start` uploads the dataset and the held-out file to the Object Store and publishes the job to the
work-queue stream (`academy.jobs.train.<any|gpu>.<run_id>`, see `academyd.worker.protocol`); the ref
is `nats:<run_id>`, so a restarted daemon re-attaches by name. `progress` replays the worker's trainer
events (`academy.jobs.events.<run_id>.<worker>`: the lease holder's only) and ends when the lease records
how the job ended; the pipeline publishes them as the same `academy.training.*` events as for a local
trainer. `result` downloads the summary and the adapter, checks both sha256 on arrival and the adapter's
manifest sha256 against the one the worker computed, and hands the pipeline a local adapter directory to register.

`AutoHabitat` sends a job to the workers when any is connected (advertised in the workers bucket),
else to the local habitat (Docker or a process).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, retry_if_not_exception_type
from tenacity import stop_after_attempt, stop_never, wait_fixed

from academyd.artifacts import ArtifactError, delete_prefix, get_dir, get_file, put_file
from academyd.events import dead_letter_subject
from academyd.habitat.base import Habitat, HabitatError, JobHandle, JobResult, JobStatus, TrainingJob
from academyd.settings import Settings
from academyd.trainer import spec as S
from academyd.worker.protocol import (
    Advertisement,
    DAEMON_WRITER,
    ArtifactRef,
    CancelMessage,
    ForwardedEvent,
    JobMessage,
    Lease,
    Timing,
    Wire,
    WireError,
    artifact_name,
    cancel_subject,
    clip,
    events_subject,
    job_subject,
)

log = structlog.get_logger("academyd.habitat.nats")

REF_PREFIX = "nats:"
FORWARDED = (S.EVENT_START, S.EVENT_PROGRESS, S.EVENT_CHECKPOINT)


def _check_cancelled() -> None:
    """Re-raise a cancellation that a library swallowed (Python 3.11's wait_for can lose one, bpo-42130):
    the task still counts it, and a polling loop must not outlive its stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _asking_again(event: str, run_id: str, errors: tuple[type[BaseException], ...], poll_s: float, *,
                  but: type[BaseException] | None = None, attempts: int | None = 10_000,
                  warn_every: int = 20) -> AsyncRetrying:
    """Ask JetStream again while it gives no answer (`errors`: a timeout, no responders, a leader being
    elected; `but` is an answer), every `poll_s`, `attempts` times at most (None: until cancelled), one
    warning `event` in `warn_every` tries. After the last try the last error is raised."""
    def said(state: RetryCallState) -> None:
        if (state.attempt_number - 1) % warn_every == 0:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(event, run_id=run_id, error=f"{type(exc).__name__}: {exc}")

    retry = retry_if_exception_type(errors)
    if but is not None:
        retry = retry & retry_if_not_exception_type(but)
    return AsyncRetrying(retry=retry, wait=wait_fixed(poll_s), before_sleep=said, reraise=True,
                         stop=stop_never if attempts is None else stop_after_attempt(attempts))


AHEAD = "ahead"


def holder_verdict(body: ForwardedEvent, lease: Lease | None) -> str | None:
    """Whether a forwarded event is the lease holder's: None if it is; AHEAD if it names a later attempt than
    the lease read (the lease moved since: judge it again); otherwise why it is dropped. Pure."""
    if lease is None or body.attempt > lease.attempt:
        return AHEAD
    if body.attempt < lease.attempt:
        return (f"from attempt {body.attempt} ({body.worker}); the lease is at attempt {lease.attempt} "
                f"({lease.worker})")
    if body.worker != lease.worker:
        return f"from {body.worker}, not the lease holder ({lease.worker}, attempt {lease.attempt})"
    return None


class NatsHabitat:
    """Runs trainer jobs on workers. Needs the daemon's NATS connection (`nc`)."""

    name = "nats"

    def __init__(self, settings: Settings, nc: Any, *, poll_s: float = 0.5) -> None:
        self.settings = settings
        self.nc = nc
        self.js = nc.jetstream(timeout=10)
        self.poll_s = poll_s
        self.timing = Timing(settings.workers.ack_wait_s)
        self._wire: Wire | None = None
        self.note: str | None = None  # why a job waits (shown in status)

    async def wire(self) -> Wire:
        if self._wire is None:
            self._wire = await Wire.open(self.js, self.settings, create=True)
        return self._wire

    async def workers(self) -> list[Advertisement]:
        """The workers advertised now; none (and nothing created) when no worker ever connected."""
        if self._wire is None:
            from nats.js.errors import BucketNotFoundError, NotFoundError

            try:
                await self.js.key_value(self.settings.workers.registry_bucket)
            except (BucketNotFoundError, NotFoundError):
                return []
        return await (await self.wire()).advertised()

    async def any_worker(self) -> bool:
        """Whether a worker is connected now; when none is, `note` says so (shown in status)."""
        try:
            ads = await self.workers()
        except Exception as exc:
            log.warning("workers_unknown", error=str(exc))
            ads = []
        if not ads:
            self.note = ("waiting for a worker: none is connected (training.autorun=false: this daemon trains "
                         "only on `academyd worker` processes)")
        return bool(ads)

    async def _lease(self, run_id: str) -> tuple[Lease | None, int]:
        """The lease, asked again while the cluster cannot answer (a node died, a leader is being elected).
        None: no lease, or one that is not valid (not trusted: the job is not over for the daemon)."""
        wire = await self.wire()
        unanswered = (NatsTimeout, NoRespondersError, APIError, ConnectionClosedError, TimeoutError)
        try:
            async for tried in _asking_again("lease_unreadable", run_id, unanswered, self.poll_s):
                with tried:
                    _check_cancelled()
                    return await wire.lease(run_id)
        except unanswered:
            raise HabitatError(f"the lease of {run_id} stayed unreadable") from None
        raise AssertionError("unreachable")  # AsyncRetrying returns or raises

    def _handle(self, run_id: str) -> JobHandle:
        return JobHandle(ref=REF_PREFIX + run_id, run_id=run_id,
                         output_dir=str((self.settings.runs_dir / run_id).resolve()))

    # ------------------------------------------------------------ start / reattach

    async def start(self, job: TrainingJob) -> JobHandle:
        wire = await self.wire()
        run_id = job.run_id
        lease, rev = await self._lease(run_id)
        handle = self._handle(run_id)
        spec = job.spec
        out = Path(handle.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "job-spec.json").write_text(json.dumps({"spec": spec.to_dict(), "spec_hash": S.spec_hash(spec)}))
        if (lease is not None and lease.final) or await self._job_queued(run_id):
            return handle  # already dispatched (a daemon restart between publish and commit): follow it
        inputs: dict[str, ArtifactRef] = {}
        try:
            inputs["dataset"] = ArtifactRef.of(await put_file(wire.artifacts, artifact_name(run_id, "dataset.jsonl"),
                                                              Path(spec.dataset_path)))
            if spec.heldout_path:
                inputs["heldout"] = ArtifactRef.of(await put_file(
                    wire.artifacts, artifact_name(run_id, "heldout.jsonl"), Path(spec.heldout_path)))
        except OSError as exc:
            raise HabitatError(f"cannot read the dataset to send to workers: {exc}") from None
        requires_gpu = bool(self.settings.workers.require_gpu)
        try:
            body = JobMessage.build(run_id=run_id, spec=spec.to_dict(), spec_hash=S.spec_hash(spec),
                                    base_model=spec.base_model, inputs=inputs, requires_gpu=requires_gpu,
                                    time_limit_s=job.time_limit_s, memory_limit_mb=job.memory_limit_mb).encode()
        except WireError as exc:
            raise HabitatError(f"job {run_id} cannot be sent to workers: {exc.detail}") from None
        msg_id = f"job-{run_id}-{S.spec_hash(spec)[:16]}" + (f"-{int(time.time())}" if rev else "")
        await self.js.publish(job_subject(run_id, requires_gpu), body, headers={"Nats-Msg-Id": msg_id})
        log.info("job_dispatched", run_id=run_id, requires_gpu=requires_gpu, subject=job_subject(run_id, requires_gpu))
        return handle

    async def reattach(self, ref: str) -> JobHandle | None:
        if not ref.startswith(REF_PREFIX):
            return None
        return self._handle(ref[len(REF_PREFIX):])

    # ------------------------------------------------------------ observe

    async def _job_queued(self, run_id: str) -> bool:
        from nats.js.errors import NotFoundError

        unanswered = (NatsTimeout, NoRespondersError, APIError, TimeoutError)  # not an answer: ask again
        for gpu in (False, True):
            with contextlib.suppress(NotFoundError, *unanswered):  # none queued, or never an answer: not queued
                async for tried in _asking_again("jobs_unreadable", run_id, unanswered, self.poll_s,
                                                 but=NotFoundError):
                    with tried:
                        await self.js.get_last_msg(self.settings.workers.jobs_stream, job_subject(run_id, gpu))
                        return True
        return False

    async def _refusal(self, run_id: str) -> str | None:
        """Why a worker refused this run's job (its dead letter's headers, see `dead_letter_job`), or None."""
        from nats.js.errors import NotFoundError

        for gpu in (False, True):
            try:
                msg = await self.js.get_last_msg(self.settings.nats.dlq_stream,
                                                 dead_letter_subject(job_subject(run_id, gpu)))
            except NotFoundError:
                continue
            except (NatsTimeout, NoRespondersError, APIError, ConnectionClosedError, TimeoutError) as exc:
                # not an answer: the next look asks again
                log.debug("dlq_unreadable", run_id=run_id, error=f"{type(exc).__name__}: {exc}")
                return None
            h = msg.headers or {}
            return f"{h.get('Academy-Reason', 'job_rejected')}: {h.get('Academy-Detail', '(no detail)')}"
        return None

    async def _fail_if_refused(self, run_id: str) -> bool:
        """A job that a worker refused (terminated and dead-lettered: it is not queued and nobody leases it)
        would leave its run waiting for ever. Its end is recorded in the lease, as a cancel before a worker
        took it is, so status, progress and result all see a failed job with the worker's reason."""
        if await self._job_queued(run_id):
            return False
        reason = await self._refusal(run_id)
        if reason is None:
            return False
        wire = await self.wire()
        end = Lease.build(run_id=run_id, state="failed", error_code="job_refused",
                          reason=clip(f"a worker refused the job ({reason}); the daemon and the worker may run "
                                      "different versions of academyd"))
        _, rev = await wire.lease(run_id)
        try:
            await wire.write_lease(run_id, DAEMON_WRITER, end, last=rev)
        except (APIError, NatsTimeout, NoRespondersError, ConnectionClosedError, TimeoutError) as exc:
            # someone wrote the lease meanwhile (KeyWrongLastSequenceError, an APIError): theirs stands
            log.info("refusal_not_recorded", run_id=run_id, error=f"{type(exc).__name__}: {exc}")
            return False
        log.warning("job_refused", run_id=run_id, reason=reason)
        return True

    async def status(self, handle: JobHandle) -> JobStatus:
        lease, _ = await self._lease(handle.run_id)
        if lease is None and await self._fail_if_refused(handle.run_id):
            lease, _ = await self._lease(handle.run_id)
        state = lease.state if lease is not None else None
        if state == "succeeded":
            return JobStatus.SUCCEEDED
        if state == "failed":
            return JobStatus.FAILED
        if state == "cancelled":
            return JobStatus.CANCELLED
        if not await self._job_queued(handle.run_id):
            return JobStatus.LOST  # neither queued nor finished: dispatch it again
        return JobStatus.RUNNING

    async def _explain_wait(self, wire: Wire, requires_gpu: bool) -> str:
        ads = await wire.advertised()
        if not ads:
            return "waiting for a worker: none is connected (start `academyd worker` on a host with the trainer)"
        if requires_gpu and not any(a.gpu for a in ads):
            return (f"waiting for a worker with a GPU: {len(ads)} connected, none has one "
                    "(training.require_gpu / workers.require_gpu is set)")
        busy = [a for a in ads if a.job]
        return f"waiting for a free worker: {len(ads)} connected, {len(busy)} busy"

    async def progress(self, handle: JobHandle) -> AsyncIterator[dict[str, Any]]:
        wire = await self.wire()
        run_id = handle.run_id
        queue: asyncio.Queue[ForwardedEvent] = asyncio.Queue()
        dropped = 0

        async def on_event(msg: Any) -> None:
            nonlocal dropped
            try:
                body = ForwardedEvent.decode(msg.data)
                if body.run_id != run_id:
                    raise WireError("foreign", f"an event of run {body.run_id} on {msg.subject}")
                if msg.subject != events_subject(run_id, body.worker):  # the server let only its sender publish there
                    raise WireError("foreign", f"an event in the name of {body.worker} on {msg.subject}")
            except WireError as exc:
                dropped += 1
                if dropped <= 10 or dropped % 100 == 0:  # a flood of them is one line in a hundred
                    log.warning("event_dropped", run_id=run_id, dropped=dropped, reason=str(exc))
                return
            await queue.put(body)

        async for tried in _asking_again("events_unreadable", run_id,
                                         (NatsTimeout, NoRespondersError, APIError, TimeoutError), self.poll_s,
                                         attempts=None, warn_every=1):
            with tried:
                sub = await self.js.subscribe(events_subject(run_id, "*"), cb=on_event, ordered_consumer=True,
                                              stream=self.settings.workers.events_stream)
        requires_gpu = self.settings.workers.require_gpu
        last_note = 0.0
        foreign: set[tuple[str, int]] = set()  # (worker, attempt) whose events were dropped: said once each
        try:
            while True:
                lease, _ = await self._lease(run_id)
                ahead: list[ForwardedEvent] = []
                while not queue.empty():
                    body = queue.get_nowait()
                    verdict = holder_verdict(body, lease)
                    if verdict == AHEAD:  # a newer lease than the one just read: look again next turn
                        if len(ahead) < 1000:
                            ahead.append(body)
                        continue
                    if verdict is not None:
                        if (body.worker, body.attempt) not in foreign:
                            foreign.add((body.worker, body.attempt))
                            log.warning("event_dropped", run_id=run_id, worker=body.worker, attempt=body.attempt,
                                        reason=verdict)
                        continue
                    if body.event.type in FORWARDED:
                        yield {**body.event.model_dump(exclude_unset=True), "worker": body.worker,
                               "attempt": body.attempt}
                for body in ahead:
                    queue.put_nowait(body)
                if lease is not None and lease.final:
                    self.note = None
                    yield self._final_event(lease)
                    return
                if lease is None or lease.state == "released":
                    if time.monotonic() - last_note > 2.0:
                        if lease is None and await self._fail_if_refused(run_id):
                            continue  # the next look finds the failed lease
                        with contextlib.suppress(Exception):
                            self.note = await self._explain_wait(wire, bool(requires_gpu))
                        last_note = time.monotonic()
                else:
                    self.note = None
                _check_cancelled()
                await asyncio.sleep(self.poll_s)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _final_event(self, lease: Lease) -> dict[str, Any]:
        if lease.state == "succeeded" and lease.result is not None:
            return {"type": S.EVENT_DONE, "time": round(time.time(), 3), "worker": lease.worker,
                    "summary": lease.result.summary_inline.model_dump()}
        return {"type": S.EVENT_ERROR, "time": round(time.time(), 3), "origin": "worker",
                "worker": lease.worker, "status": lease.state, "code": lease.error_code,
                "reason": lease.reason, "exit_code": lease.exit_code}

    async def result(self, handle: JobHandle) -> JobResult:
        wire = await self.wire()
        while True:
            lease, _ = await self._lease(handle.run_id)
            if lease is not None and lease.final:
                break
            _check_cancelled()
            await asyncio.sleep(self.poll_s)
        state = lease.state
        if state != "succeeded" or lease.result is None:
            status = JobStatus.FAILED if state == "failed" else JobStatus.CANCELLED
            return JobResult(status=status, exit_code=lease.exit_code,
                             reason=(f"on worker {lease.worker}: " if lease.worker else "")
                             + (lease.reason or state),
                             summary=None, adapter_path=None, error_code=lease.error_code)
        try:
            adapter, summary = await self._fetch_result(wire, handle, lease)
        except ArtifactError as exc:
            return JobResult(status=JobStatus.FAILED, exit_code=None, reason=f"result of worker "
                             f"{lease.worker} unusable: {exc}", summary=None, adapter_path=None,
                             error_code="artifact")
        with contextlib.suppress(Exception):  # the checkpoints served their purpose; the bucket TTL is the backstop
            await delete_prefix(wire.artifacts, artifact_name(handle.run_id, "ckpt/"))
        return JobResult(status=JobStatus.SUCCEEDED, exit_code=S.EXIT_OK, reason=None, summary=summary,
                         adapter_path=str(adapter))

    async def _fetch_result(self, wire: Wire, handle: JobHandle, lease: Lease) -> tuple[Path, dict[str, Any]]:
        from academyd.registry import adapter_sha256

        res = lease.result
        assert res is not None  # a succeeded lease has one (Lease validates it)
        out = Path(handle.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        await get_file(wire.artifacts, res.summary.name, out / S.SUMMARY_FILE, sha256=res.summary.sha256,
                       pinned=res.summary.artifact())  # the holder's chunks, whatever was uploaded over the name
        if res.loss is not None:
            await get_file(wire.artifacts, res.loss.name, out / S.LOSS_FILE, sha256=res.loss.sha256,
                           pinned=res.loss.artifact())
        adapter_dir = out / S.ADAPTER_DIR
        await get_dir(wire.artifacts, res.adapter.name, adapter_dir, sha256=res.adapter.sha256,
                      pinned=res.adapter.artifact())
        local = await asyncio.to_thread(adapter_sha256, adapter_dir)
        if local != res.adapter_sha256:
            raise ArtifactError(f"the adapter's files hash to {local}, the worker computed {res.adapter_sha256}")
        summary = json.loads((out / S.SUMMARY_FILE).read_text())
        # The job's identity is the daemon's spec; the worker's (its local paths) is kept beside it.
        summary["worker"] = {"id": lease.worker, "attempt": lease.attempt,
                             "spec_hash": summary.get("spec_hash"), "adapter_sha256": res.adapter_sha256}
        spec = json.loads((out / "job-spec.json").read_text()) if (out / "job-spec.json").exists() else None
        if spec:
            summary["spec"], summary["spec_hash"] = spec["spec"], spec["spec_hash"]
        return adapter_dir, summary

    # ------------------------------------------------------------ control

    async def cancel(self, handle: JobHandle, *, grace_s: float = 10.0) -> None:
        wire = await self.wire()
        lease, rev = await wire.lease(handle.run_id)
        if lease is not None and lease.final:
            return
        await self.nc.publish(cancel_subject(handle.run_id), CancelMessage.build(grace_s=grace_s).encode())
        if lease is None:  # nobody (that we trust) holds it: take it off the queue and record the end
            for gpu in (False, True):
                with contextlib.suppress(Exception):
                    await self.js.purge_stream(self.settings.workers.jobs_stream, subject=job_subject(handle.run_id, gpu))
            end = Lease.build(run_id=handle.run_id, state="cancelled", reason="cancelled before a worker took it")
            with contextlib.suppress(Exception):
                await wire.write_lease(handle.run_id, DAEMON_WRITER, end, last=rev)  # on records not honoured too

    def status_note(self) -> str | None:
        return self.note


class AutoHabitat:
    """Workers when any is connected, else the local habitat; a handle stays with the habitat that started it."""

    def __init__(self, remote: NatsHabitat, local: Habitat) -> None:
        self.remote = remote
        self.local = local
        self.name = local.name

    def _for(self, handle: JobHandle) -> Any:
        return self.remote if handle.ref.startswith(REF_PREFIX) else self.local

    async def start(self, job: TrainingJob) -> JobHandle:
        try:
            ads = await self.remote.workers()
        except Exception as exc:
            log.warning("workers_unknown", error=str(exc))
            ads = []
        habitat: Any = self.remote if ads else self.local
        self.name = habitat.name
        log.info("habitat_auto", chosen=habitat.name, workers=len(ads))
        return await habitat.start(job)

    def progress(self, handle: JobHandle) -> AsyncIterator[dict[str, Any]]:
        return self._for(handle).progress(handle)

    async def status(self, handle: JobHandle) -> JobStatus:
        return await self._for(handle).status(handle)

    async def cancel(self, handle: JobHandle, *, grace_s: float = 10.0) -> None:
        await self._for(handle).cancel(handle, grace_s=grace_s)

    async def result(self, handle: JobHandle) -> JobResult:
        return await self._for(handle).result(handle)

    async def reattach(self, ref: str) -> JobHandle | None:
        habitat = self.remote if ref.startswith(REF_PREFIX) else self.local
        self.name = habitat.name
        return await habitat.reattach(ref)

    def status_note(self) -> str | None:
        return self.remote.status_note()
