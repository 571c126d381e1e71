"""The wire between the daemon (the `nats` habitat) and `academyd worker` processes. Nothing else is shared.

Subjects, streams and buckets (names from `settings.workers`; replicas from `settings.nats.replicas`):

    academy.jobs.train.any.<run_id>   a training job any worker may take    } ACADEMY_JOBS: a work-queue
    academy.jobs.train.gpu.<run_id>   a job only a worker with a GPU takes  } stream, one durable pull
                                                                            } consumer per capability
    academy.jobs.events.<run_id>      the trainer's events, as the worker forwards them (ACADEMY_JOB_EVENTS)
    academy.jobs.cancel.<run_id>      core NATS: the daemon asks the holder to stop
    KV academy_workers  <worker id>   what a worker has (GPU, CPU threads, trainer versions, its job); TTL
    KV academy_leases   <run_id>      who holds a job, its last checkpoint, its result: the fence
    Object store academy_artifacts    runs/<run_id>/{dataset.jsonl, heldout.jsonl, ckpt/<step>.tar,
                                      adapter.tar, summary.json, loss.jsonl}

The lease is the fence. A worker holds a job while it can refresh the lease by compare-and-swap on its
revision (every heartbeat, and before recording a checkpoint or the result). A holder that cannot refresh
for `stop_after_s` kills its trainer. A worker that receives a redelivered job takes the lease only after
watching it stay unrefreshed for `takeover_wait_s` (> stop_after_s plus a heartbeat), so the earlier holder
has stopped by then: never two trainers on one job, and no clock is compared across hosts.
The job message is acked after the result is stored, verified and recorded in the lease.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

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

from academyd.artifacts import ArtifactStore, ensure_bucket
from academyd.settings import Settings

SCHEMA_VERSION = 1
CAPABILITIES = ("any", "gpu")
FINAL_STATES = ("succeeded", "failed", "cancelled")
# Lease states: training (held), released (given back on a clean stop: take it at once), and the finals.


def job_subject(run_id: str, requires_gpu: bool) -> str:
    return f"academy.jobs.train.{'gpu' if requires_gpu else 'any'}.{run_id}"


def events_subject(run_id: str) -> str:
    return f"academy.jobs.events.{run_id}"


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


def dumps(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()


def loads(data: bytes | None) -> Any:
    return json.loads(data) if data else None


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
        return cls(js=js, settings=settings, artifacts=artifacts, workers=workers, leases=leases)

    async def lease(self, run_id: str) -> tuple[dict[str, Any] | None, int]:
        """The lease record of `run_id` and its revision (None, 0 when there is none)."""
        try:
            entry = await self.leases.get(run_id)
        except NotFoundError:
            return None, 0
        value = loads(entry.value)
        return (value if isinstance(value, dict) else None), int(entry.revision or 0)

    async def advertised(self) -> list[dict[str, Any]]:
        """Every worker whose advertisement has not expired."""
        out: list[dict[str, Any]] = []
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
            ad = loads(entry.value)
            if isinstance(ad, dict):
                out.append(ad)
        return out


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
