"""The wire between the daemon (the `nats` habitat) and `academyd worker` processes. Nothing else is shared.

Subjects, streams and buckets (names from `settings.workers`; replicas from `settings.nats.replicas`):

    academy.jobs.train.any.<run_id>   a training job any worker may take    } ACADEMY_JOBS: a work-queue
    academy.jobs.train.gpu.<run_id>   a job only a worker with a GPU takes  } stream, one durable pull
                                                                            } consumer per capability
    academy.jobs.events.<run_id>.<worker id>  the trainer's events as the worker forwards them
                                      (ACADEMY_JOB_EVENTS; a worker's identity may publish only its own)
    academy.jobs.cancel.<run_id>      core NATS: the daemon asks the holder to stop
    KV academy_workers  <worker id>   what a worker has (GPU, CPU threads, trainer versions, its job); TTL
    KV academy_leases   <run_id>.<writer>  the job's lease records, each under its writer's key (a worker
                                      id, `_academyd` for the daemon): the fence (academyd.worker.trust)
    Object store academy_artifacts    runs/<run_id>/{dataset.jsonl, heldout.jsonl,
                                      ckpt/<step>-<worker>-a<attempt>.tar,
                                      <worker>-a<attempt>/{adapter.tar, summary.json, loss.jsonl}}

The lease is the fence. A worker holds a job while it can refresh the lease by compare-and-swap on its
revision (every heartbeat, and before recording a checkpoint or the result). A holder that cannot refresh
for `stop_after_s` kills its trainer. A worker that receives a redelivered job takes the lease only after
watching it stay unrefreshed for `takeover_wait_s` (> stop_after_s plus a heartbeat), so the earlier holder
has stopped by then: never two trainers on one job, and no clock is compared across hosts.
The job message is acked after the result is stored, verified and recorded in the lease.

Trust per worker (academyd.worker.trust): each worker has its own NATS identity, which may write lease
records, events and its advertisement only under its own id, so the server says who wrote what; a record
that names another worker, or a takeover written while the holder's heartbeat was fresh, is not honoured.
Objects are read by the chunks' nuid the lease or the job records (an upload over a name replaces nothing
that is used), and the buckets' streams take no rollup header (a publish with one would purge them).

Two kinds of job travel this way, told apart by the message's `kind`: a training job (JobMessage, no
`kind` or "train") and an arena measurement (EvalJob, "evaluate": arena.where = worker; its id is
`<run_id>-arena-<...>`, its inputs the candidate's and the champion's adapters and the held-out, checks
and general sets, its result the measurement JSON and the arena directory with the GGUF adapters, in the
lease's `evaluation`). Same queue, same lease, same object store; the gate itself stays on the daemon.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self

import structlog
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from academyd.artifacts import Artifact, ArtifactStore, ensure_bucket
from academyd.events import dead_letter, describe
from academyd.settings import Settings
from academyd.trainer import spec as S

log = structlog.get_logger("academyd.worker.protocol")

SCHEMA_VERSION = 1
CAPABILITIES = ("any", "gpu")
FINAL_STATES = ("succeeded", "failed", "cancelled")
# Lease states: training (held), released (given back on a clean stop: take it at once), and the finals.
LEASE_STATES = ("training", "released", *FINAL_STATES)


def job_subject(run_id: str, requires_gpu: bool) -> str:
    return f"academy.jobs.train.{'gpu' if requires_gpu else 'any'}.{run_id}"


DAEMON_WRITER = "_academyd"  # the key token of the daemon's lease records (a worker id starts alphanumeric)


def events_subject(run_id: str, worker: str) -> str:
    """Where `worker` forwards the trainer events of `run_id` ("*": every worker's, as the daemon reads)."""
    return f"academy.jobs.events.{run_id}.{worker}"


def cancel_subject(run_id: str) -> str:
    return f"academy.jobs.cancel.{run_id}"


def consumer_name(capability: str) -> str:
    return f"academy-workers-{capability}"


def artifact_name(run_id: str, what: str) -> str:
    return f"runs/{run_id}/{what}"


@dataclass(frozen=True)
class Timing:
    """Heartbeat arithmetic from the job ack wait A: beat A/4, a holder stops after A/2 without a refresh,
    a taker waits 3A/4 of silence (so the old holder has stopped), a job moves after A + 3A/4 at most."""

    ack_wait_s: float

    @property
    def heartbeat_s(self) -> float:
        return self.ack_wait_s / 4

    @property
    def stop_after_s(self) -> float:
        return self.ack_wait_s / 2

    @property
    def takeover_wait_s(self) -> float:
        return self.ack_wait_s * 3 / 4

    @property
    def fresh_s(self) -> float:
        """A holder whose last record is younger than this (5A/8: after a holder stops, before a taker
        may take) still works: a takeover written then is not honoured (academyd.worker.trust)."""
        return self.ack_wait_s * 5 / 8


# ---------------------------------------------------------------- the messages and records
#
# One pydantic model per message and record, used on both ends: `build` validates what is about to be
# sent (a malformed message is never sent: WireError), `decode` checks what arrived (WireError: the caller
# rejects it and logs why). Strict: JSON types as they are (no "3" for 3, no 1 for true), no NaN, required
# fields required, and a bound on everything a peer controls (the bytes first, then each string).
#
# Extra fields: refused on the job message, the lease and the cancel (a worker must not run a job with an
# instruction it does not understand; the lease is the fence and carries the result the daemon trusts: a
# field nobody here wrote means a writer that is not ours). Ignored on the advertisement (informational:
# a newer worker may say more about itself without looking absent). Kept on a forwarded trainer event
# (the trainer owns its event fields; the ones the daemon reads are typed here).

RUN_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}"  # one subject token, one path component, one KV key
WORKER_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}"  # one subject token (hostname-pid by default)
SHA256_PATTERN = r"[0-9a-f]{64}"
# runs/<run_id>/<what>[/<what>...], no "." or ".." component (academyd.worker.protocol.artifact_name).
ARTIFACT_NAME_PATTERN = rf"runs/{RUN_ID_PATTERN}(/[A-Za-z0-9_][A-Za-z0-9_.-]{{0,199}}){{1,4}}"
WORKER_ID_RE = re.compile(WORKER_ID_PATTERN)

# Bytes a message or record may have before it is parsed (each is a few KB when well formed).
JOB_MAX_BYTES = 256 * 1024
EVENT_MAX_BYTES = 64 * 1024
LEASE_MAX_BYTES = 64 * 1024
ADVERT_MAX_BYTES = 16 * 1024
CANCEL_MAX_BYTES = 1024
REASON_MAX = 4000  # characters of a failure reason kept in the lease (the worker's log has the rest)

RunId = Field(pattern=rf"^{RUN_ID_PATTERN}$", description="The daemon's run id.")
WorkerId = Field(pattern=rf"^{WORKER_ID_PATTERN}$", description="A worker's id (its key in academy_workers).")
Sha256 = Field(pattern=rf"^{SHA256_PATTERN}$", description="sha256, lower-case hex.")


class WireError(ValueError):
    """A message or record that is not what the wire says: `code` (for logs and dead letters), the detail."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class WireModel(_Part):
    """A top-level message or record: carries `schema_version`; `build` to send, `decode` to receive."""

    MAX_BYTES: ClassVar[int] = 64 * 1024

    schema_version: int = Field(description=f"Version of the worker wire; this academyd speaks {SCHEMA_VERSION}.")

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"schema_version {v} is not understood here (this academyd speaks {SCHEMA_VERSION}): "
                             "run the same academyd release on the daemon and its workers")
        return v

    @classmethod
    def build(cls, **fields: Any) -> Self:
        """The message to send, validated (WireError `unsendable`: a bug on this side, nothing is sent)."""
        try:
            return cls.model_validate({"schema_version": SCHEMA_VERSION, **fields})
        except ValidationError as exc:
            raise WireError("unsendable", f"{cls.__name__} does not match the wire: {describe(exc)}") from None

    @classmethod
    def decode(cls, data: bytes | None) -> Self:
        """What arrived, checked (WireError `too_large` or `invalid`)."""
        data = data or b""
        if len(data) > cls.MAX_BYTES:
            raise WireError("too_large", f"{cls.__name__} of {len(data)} bytes (at most {cls.MAX_BYTES})")
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise WireError("invalid", f"not a valid {cls.__name__}: {describe(exc)}") from None

    def encode(self) -> bytes:
        data = self.model_dump_json(exclude_unset=True).encode()
        if len(data) > self.MAX_BYTES:
            raise WireError("unsendable", f"{type(self).__name__} of {len(data)} bytes (at most {self.MAX_BYTES})")
        return data


class ArtifactRef(_Part):
    """An object in the artifact store (academyd.artifacts.Artifact): its name, sha256 and size."""

    name: str = Field(max_length=600, pattern=rf"^{ARTIFACT_NAME_PATTERN}$")
    sha256: str = Sha256
    size: int = Field(ge=0)
    nuid: str | None = Field(default=None, pattern=r"^[A-Za-z0-9]{1,64}$",
                             description="Its chunks' subject token: read by it, not by the name's newest meta.")

    @classmethod
    def of(cls, art: Artifact) -> ArtifactRef:
        return cls(name=art.name, sha256=art.sha256, size=art.size, nuid=art.nuid)

    def artifact(self) -> Artifact:
        return Artifact(name=self.name, sha256=self.sha256, size=self.size, nuid=self.nuid)

    def belongs_to(self, run_id: str) -> bool:
        return self.name.startswith(artifact_name(run_id, ""))


class JobInputs(_Part):
    dataset: ArtifactRef
    heldout: ArtifactRef | None = None


class JobMessage(WireModel):
    """`academy.jobs.train.<any|gpu>.<run_id>`: a training job, as the daemon dispatches it."""

    MAX_BYTES: ClassVar[int] = JOB_MAX_BYTES

    kind: Literal["train"] = Field(default="train", description="The job's type (EvalJob: evaluate).")
    run_id: str = RunId
    spec: dict[str, Any] = Field(description="The daemon's TrainSpec (to_dict); its paths are the daemon's.")
    spec_hash: str = Sha256
    base_model: str = Field(min_length=1, max_length=4096, description="The daemon's reference (a worker maps it).")
    inputs: JobInputs
    requires_gpu: bool
    time_limit_s: float | None = Field(default=None, gt=0)
    memory_limit_mb: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        spec = S.TrainSpec.from_dict(self.spec)  # SpecError (a ValueError) names every bad field
        if S.spec_hash(spec) != self.spec_hash:
            raise ValueError("spec_hash is not the hash of spec")
        if spec.base_model != self.base_model:
            raise ValueError("base_model is not the spec's base_model")
        if spec.run_id is not None and spec.run_id != self.run_id:
            raise ValueError("spec.run_id is not run_id")
        for what, art in (("dataset", self.inputs.dataset), ("heldout", self.inputs.heldout)):
            if art is not None and not art.belongs_to(self.run_id):
                raise ValueError(f"inputs.{what} is not an artifact of run {self.run_id}")
        return self

    def train_spec(self) -> S.TrainSpec:
        return S.TrainSpec.from_dict(self.spec)

    def check_subject(self, subject: str) -> None:
        """The job came on its own subject (the run id and capability it names); WireError otherwise."""
        if subject != job_subject(self.run_id, self.requires_gpu):
            raise WireError("subject_mismatch", f"a job for {self.run_id} (requires_gpu={self.requires_gpu}) "
                            f"arrived on {subject}")


class ArenaOptions(_Part):
    """What the arena's measurement is asked, apart from its files (academyd.arena.contest.measure_options)."""

    format: Literal["alpaca", "sharegpt"]
    render: Literal["chat", "plain"]
    runtime: Literal["llamacpp", "none"]
    serve: Literal["adapter", "merged"]
    generation_sample: int = Field(ge=0, le=100_000)
    general_sample: int = Field(ge=0, le=100_000)
    answer_sample: int = Field(ge=0, le=100_000)
    max_new_tokens: int = Field(ge=1, le=100_000)
    max_length: int | None = Field(default=None, ge=1)
    seed: int
    cpu_threads: int | None = Field(default=None, ge=1, le=4096)
    time_limit_s: float = Field(gt=0)


class EvalInputs(_Part):
    candidate: ArtifactRef  # the adapter directory, as a tar
    champion: ArtifactRef | None = None  # None: the champion is the base model
    heldout: ArtifactRef
    general: ArtifactRef
    checks: ArtifactRef | None = None


class EvalJob(WireModel):
    """`academy.jobs.train.<any|gpu>.<job id>` with kind "evaluate": the arena's measurement of a candidate
    (arena.where = worker). `run_id` is the job's id (`<run_id>-arena-<...>`: its lease key and artifacts)."""

    MAX_BYTES: ClassVar[int] = JOB_MAX_BYTES

    kind: Literal["evaluate"]
    run_id: str = RunId
    base_model: str = Field(min_length=1, max_length=4096, description="The daemon's reference (a worker maps it).")
    inputs: EvalInputs
    arena: ArenaOptions
    requires_gpu: bool

    @model_validator(mode="after")
    def _own_inputs(self) -> Self:
        for what in EvalInputs.model_fields:
            art = getattr(self.inputs, what)
            if art is not None and not art.belongs_to(self.run_id):
                raise ValueError(f"inputs.{what} is not an artifact of job {self.run_id}")
        return self

    check_subject = JobMessage.check_subject


def decode_job(data: bytes | None) -> JobMessage | EvalJob:
    """A job message of either kind, checked (WireError): its `kind` picks the model."""
    data = data or b""
    if len(data) > JOB_MAX_BYTES:
        raise WireError("too_large", f"a job of {len(data)} bytes (at most {JOB_MAX_BYTES})")
    try:
        kind = json.loads(data).get("kind", "train")
    except (ValueError, AttributeError):
        kind = "train"  # not a JSON object: JobMessage.decode says why
    return EvalJob.decode(data) if kind == "evaluate" else JobMessage.decode(data)


class TrainerEvent(_Part):
    """One trainer event (academyd.trainer.events); the fields the daemon reads are typed."""

    model_config = ConfigDict(extra="allow")

    type: Literal["start", "progress", "checkpoint", "done", "error"]
    time: float
    step: int | None = Field(default=None, ge=0)
    total_steps: int | None = Field(default=None, ge=0)
    epoch: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    eval_loss: float | None = None

    @model_validator(mode="after")
    def _step_where_needed(self) -> Self:
        if self.type in (S.EVENT_PROGRESS, S.EVENT_CHECKPOINT) and self.step is None:
            raise ValueError(f"a {self.type} event needs its step")
        return self


class ForwardedEvent(WireModel):
    """`academy.jobs.events.<run_id>`: a trainer event as the worker that holds the job forwards it."""

    MAX_BYTES: ClassVar[int] = EVENT_MAX_BYTES

    run_id: str = RunId
    worker: str = WorkerId
    attempt: int = Field(ge=1)
    event: TrainerEvent


class CancelMessage(WireModel):
    """`academy.jobs.cancel.<run_id>` (core NATS): the daemon asks the holder to stop."""

    MAX_BYTES: ClassVar[int] = CANCEL_MAX_BYTES

    grace_s: float = Field(ge=0, le=3600)


class GpuInfo(_Part):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(max_length=200)
    memory_mb: int = Field(ge=0)
    count: int = Field(ge=1)


class Advertisement(WireModel):
    """KV academy_workers `<worker id>`: what a worker has, refreshed every heartbeat (the bucket's TTL)."""

    model_config = ConfigDict(extra="ignore")
    MAX_BYTES: ClassVar[int] = ADVERT_MAX_BYTES

    worker: str = WorkerId
    host: str = Field(max_length=255)
    platform: str = Field(max_length=500)
    gpu: GpuInfo | None = None
    cpu_threads: int = Field(ge=1)
    trainer: dict[str, str] = Field(default_factory=dict, max_length=16,
                                    description="python, torch, transformers, peft, trl: their versions.")
    job: str | None = Field(default=None, pattern=rf"^{RUN_ID_PATTERN}$", description="The run it trains.")
    at: float

    @field_validator("trainer")
    @classmethod
    def _short(cls, v: dict[str, str]) -> dict[str, str]:
        if any(len(k) > 50 or len(x) > 100 for k, x in v.items()):
            raise ValueError("a trainer package name or version is too long")
        return v


class Checkpoint(_Part):
    step: int = Field(ge=0)
    artifact: ArtifactRef
    worker: str = WorkerId


class SummaryInline(_Part):
    """The few summary fields the daemon's done event carries before it downloads summary.json."""

    backend: str | None = Field(default=None, max_length=50)
    final_loss: float | None = None
    steps: int | None = Field(default=None, ge=0)
    resumed_from: int | None = Field(default=None, ge=0)
    duration_s: float | None = Field(default=None, ge=0)


class JobOutcome(_Part):
    """What a worker sends back: the adapter (a tar), its manifest sha256, the summary and the loss log."""

    adapter: ArtifactRef
    adapter_sha256: str = Sha256
    summary: ArtifactRef
    loss: ArtifactRef | None = None
    summary_inline: SummaryInline


class EvalOutcome(_Part):
    """What a worker sends back from an evaluation job: the measurement (JSON, as `academyd.arena.measure`
    printed it) and the arena directory (GGUF adapters, probes.json: a tar); `out_dir` is where that
    directory was on the worker (the measurement's paths name it; the daemon maps them to its own)."""

    measurement: ArtifactRef
    arena_dir: ArtifactRef
    out_dir: str = Field(min_length=1, max_length=4096)


class Lease(WireModel):
    """KV academy_leases `<run_id>.<writer>`: who holds the job, its last checkpoint, how it ended. The fence."""

    MAX_BYTES: ClassVar[int] = LEASE_MAX_BYTES

    run_id: str = RunId
    state: Literal["training", "released", "succeeded", "failed", "cancelled"]
    worker: str | None = Field(default=None, pattern=rf"^{WORKER_ID_PATTERN}$")
    host: str | None = Field(default=None, max_length=255)
    attempt: int = Field(default=0, ge=0, le=1_000_000)
    checkpoint: Checkpoint | None = None
    beat: float | None = None
    result: JobOutcome | None = None
    evaluation: EvalOutcome | None = None  # an evaluation job's result (EvalJob), in place of `result`
    reason: str | None = Field(default=None, max_length=REASON_MAX)
    error_code: str | None = Field(default=None, max_length=100)
    exit_code: int | None = None

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.state in ("training", "released") and (self.worker is None or self.attempt < 1):
            raise ValueError(f"a {self.state} lease names its worker and attempt")
        if (self.state == "succeeded") != ((self.result is not None) + (self.evaluation is not None) == 1):
            raise ValueError("a result exactly when the state is succeeded (`result` of a training job or "
                             "`evaluation` of an evaluation job, not both)")
        arts = [self.checkpoint.artifact] if self.checkpoint else []
        if self.result is not None:
            arts += [self.result.adapter, self.result.summary, *([self.result.loss] if self.result.loss else [])]
        if self.evaluation is not None:
            arts += [self.evaluation.measurement, self.evaluation.arena_dir]
        if any(not a.belongs_to(self.run_id) for a in arts):
            raise ValueError(f"an artifact that is not run {self.run_id}'s")
        return self

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def changed(self, **changes: Any) -> Lease:
        """This lease with `changes`, validated (WireError `unsendable`)."""
        return Lease.build(**{**self.model_dump(exclude={"schema_version"}), **changes})


def clip(text: str | None, limit: int = REASON_MAX) -> str | None:
    """A reason short enough for the lease (its end kept: that is where a traceback says what failed)."""
    if text is None or len(text) <= limit:
        return text
    return "..." + text[-(limit - 3):]


async def dead_letter_job(js: Any, msg: Any, error: WireError) -> bool:
    """Keep a rejected job message in the DLQ stream, with why (academyd.events.dead_letter, as the bus);
    False if that failed (no DLQ stream, no permission: the worker's log line is then the only record)."""
    meta = getattr(msg, "metadata", None)
    subject, data, headers = dead_letter(
        msg.subject, bytes(msg.data or b""), reason=f"job_{error.code}", detail=error.detail,
        stream=getattr(meta, "stream", None) or "jobs",
        stream_seq=getattr(getattr(meta, "sequence", None), "stream", None) or 0)
    try:
        await js.publish(subject, data, headers=headers)
    except Exception as exc:
        log.warning("job_dead_letter_failed", subject=msg.subject, error=f"{type(exc).__name__}: {exc}")
        return False
    return True


@dataclass
class Wire:
    """Handles on everything above, created if missing (the daemon creates them; a worker binds, and
    creates only where its permissions allow, so a worker may start first on a development box)."""

    js: Any
    settings: Settings
    artifacts: ArtifactStore
    workers: Any  # KeyValue
    leases: Any  # KeyValue

    @classmethod
    async def open(cls, js: Any, settings: Settings, *, create: bool = True) -> Wire:
        w, n = settings.workers, settings.nats
        timing = Timing(w.ack_wait_s)
        if create:
            await _ensure_stream(js, StreamConfig(
                name=w.jobs_stream, description="Training jobs for academyd workers (work queue)",
                subjects=["academy.jobs.train.>"], retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
                num_replicas=n.replicas, duplicate_window=n.duplicate_window_s, max_age=7 * 24 * 3600,
            ))
            await _ensure_stream(js, StreamConfig(
                name=w.events_stream, description="Trainer events forwarded by academyd workers",
                subjects=["academy.jobs.events.>"], retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
                num_replicas=n.replicas, max_age=7 * 24 * 3600,
            ))
            for cap in CAPABILITIES:
                try:
                    await js.consumer_info(w.jobs_stream, consumer_name(cap))
                    continue
                except NotFoundError:
                    pass
                await js.add_consumer(w.jobs_stream, ConsumerConfig(
                    durable_name=consumer_name(cap), description=f"academyd workers ({cap})",
                    deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT, ack_wait=w.ack_wait_s,
                    max_deliver=-1, max_ack_pending=1000, filter_subject=f"academy.jobs.train.{cap}.>",
                ))
        workers = await _kv(js, KeyValueConfig(
            bucket=w.registry_bucket, description="academyd workers: what each has", history=1,
            ttl=timing.heartbeat_s * 3, storage=StorageType.FILE, replicas=n.replicas), create)
        leases = await _kv(js, KeyValueConfig(
            bucket=w.leases_bucket, description="academyd workers: who holds which job", history=64,
            ttl=7 * 24 * 3600, storage=StorageType.FILE, replicas=n.replicas), create)
        artifacts = await ensure_bucket(js, w.artifacts_bucket, replicas=n.replicas, ttl_s=w.artifacts_ttl_h * 3600)
        if create:  # no rollup header on these streams: a publish with one purges (academyd.worker.trust)
            for stream in (f"KV_{w.registry_bucket}", f"KV_{w.leases_bucket}", f"OBJ_{w.artifacts_bucket}"):
                await refuse_rollups(js, stream)
        return cls(js=js, settings=settings, artifacts=artifacts, workers=workers, leases=leases)

    # Entries that were not trusted, by (key, revision): each is logged once, not at every poll.
    _untrusted: set[tuple[str, int]] = field(default_factory=set)

    def _distrust(self, what: str, key: str, rev: int, reason: str) -> None:
        if (key, rev) not in self._untrusted:
            self._untrusted.add((key, rev))
            if len(self._untrusted) > 10_000:
                self._untrusted.clear()
            log.warning(f"{what}_untrusted", key=key, revision=rev, reason=reason)

    _book: Any = None  # academyd.worker.trust.LeaseBook

    @property
    def book(self) -> Any:
        if self._book is None:
            from academyd.worker.trust import LeaseBook

            w = self.settings.workers
            self._book = LeaseBook(self.js, w.leases_bucket, Timing(w.ack_wait_s))
        return self._book

    async def lease(self, run_id: str) -> tuple[Lease | None, int]:
        """The effective lease of `run_id` (academyd.worker.trust) and the fence's revision: (None, 0) when
        there is none; (None, revision) when no record is honoured (written by a third party, or damaged):
        nothing in them is trusted, but the revision still fences (a taker waits it out as for a silent holder)."""
        return await self.book.lease(run_id)

    async def write_lease(self, run_id: str, writer: str, lease: Lease, *, last: int) -> int:
        """`lease` as `writer`'s record, if the fence is still at `last` (0: no record); the new revision.
        KeyWrongLastSequenceError when another record came first."""
        return int(await self.book.write(run_id, writer, lease, last=last))

    async def advertised(self) -> list[Advertisement]:
        """Every worker whose advertisement has not expired and is valid (anything else is absent)."""
        out: list[Advertisement] = []
        try:
            keys = await self.workers.keys()
        except NotFoundError:  # nats-py raises NoKeysError (a NotFoundError) on an empty bucket
            return out
        except Exception:
            return out
        for key in keys:
            try:
                entry = await self.workers.get(key)
            except NotFoundError:
                continue
            rev = int(entry.revision or 0)
            try:
                ad = Advertisement.decode(entry.value)
                if ad.worker != key:
                    raise WireError("foreign", f"the advertisement under {key} is worker {ad.worker}'s")
            except WireError as exc:
                self._distrust("advertisement", key, rev, str(exc))
                continue
            out.append(ad)
        return out


async def refuse_rollups(js: Any, stream: str) -> None:
    """`stream` takes no `Nats-Rollup` header any more (one from any publisher purges a subject or the whole
    stream); the object store's puts and deletes here need none (academyd.artifacts)."""
    config = (await js.stream_info(stream)).config
    if config.allow_rollup_hdrs:
        config.allow_rollup_hdrs = False
        await js.update_stream(config)
        log.info("stream_rollups_refused", stream=stream)


async def _ensure_stream(js: Any, config: StreamConfig) -> None:
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)


async def _kv(js: Any, config: KeyValueConfig, create: bool) -> Any:
    try:
        return await js.key_value(config.bucket)
    except (BucketNotFoundError, NotFoundError):
        if not create:
            raise
    return await js.create_key_value(config)
