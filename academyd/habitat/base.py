"""The habitat interface: where a training job lives (a local process, a container, later a remote worker).

A habitat starts a trainer on a spec, streams the trainer's events, tells the job's status, cancels it and
hands back its result. It must not assume the trainer runs on the daemon's host: everything the daemon
learns comes from the trainer's JSON events (the same dicts the trainer prints, see
`academyd.trainer.__main__`) and from the `JobResult`, never from poking at the trainer's process directly.

The daemon persists `JobHandle.ref` (a string) with the run. After a daemon restart it calls
`reattach(ref)` on the same kind of habitat and carries on: progress, status, cancel and result all work
on a re-attached handle.

Lifecycle, as the daemon drives it:

    handle = await habitat.start(job)            # returns once the job is launched
    store.save_ref(run_id, handle.ref)
    async for event in habitat.progress(handle): # ends when the job ends (after done/error or death)
        publish(event)                           # "start", "progress", "checkpoint", "done", "error"
    result = await habitat.result(handle)        # waits for the end; JobResult
    ...
    handle = await habitat.reattach(ref)         # after a restart; None: the habitat knows no such job

Implementations: `academyd.habitat.process.ProcessHabitat` (a local process group), the Docker habitat
(`academyd.habitat.docker`). `academyd.habitat.habitat_for(settings)` picks one.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from academyd.trainer.spec import TrainSpec


class HabitatError(Exception):
    """The habitat cannot run the job (trainer environment missing, engine down); says what to do."""


class JobStatus(str, enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"  # gone without a result (host rebooted, killed from outside); its checkpoints may resume

    @property
    def finished(self) -> bool:
        return self is not JobStatus.RUNNING


@dataclass(frozen=True)
class TrainingJob:
    """What to run and within which limits. `spec.output_dir` is where the trainer writes."""

    spec: TrainSpec
    run_id: str
    time_limit_s: float | None = None  # wall-clock limit; None: no limit
    memory_limit_mb: int | None = None  # resident memory of the trainer; None or 0: no limit
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the trainer


@dataclass(frozen=True)
class JobHandle:
    """A started job. `ref` is opaque to the daemon, which stores it and gives it back to `reattach`."""

    ref: str
    run_id: str
    output_dir: str


@dataclass(frozen=True)
class JobResult:
    """How a job ended. `summary` is the trainer's summary.json (None unless it succeeded)."""

    status: JobStatus
    exit_code: int | None  # the trainer's exit code (see academyd.trainer.spec EXIT_*); None if unknown
    reason: str | None  # why it failed, was cancelled or lost; None on success
    summary: dict[str, Any] | None
    adapter_path: str | None  # the adapter directory as the daemon can read it; None unless succeeded
    error_code: str | None = None  # the trainer's error "code" (bad_input, loss_nan, ...) or the habitat's


@runtime_checkable
class Habitat(Protocol):
    """Runs trainer jobs. All methods are safe to call on handles from `start` or from `reattach`."""

    name: str

    async def start(self, job: TrainingJob) -> JobHandle:
        """Launch the trainer on `job.spec`; return as soon as it runs. Raises HabitatError when it cannot."""
        ...

    def progress(self, handle: JobHandle) -> AsyncIterator[dict[str, Any]]:
        """The trainer's events of this attempt, in order, as dicts; ends when the job has ended.

        A re-attached handle replays the attempt's events from its beginning, so a watcher that missed
        some sees them (events carry "step"; consumers that publish should tolerate repeats).
        """
        ...

    async def status(self, handle: JobHandle) -> JobStatus:
        """Where the job stands now; never blocks on the job."""
        ...

    async def cancel(self, handle: JobHandle, *, grace_s: float = 10.0) -> None:
        """Stop the job: ask politely (SIGTERM or equivalent), then force after `grace_s`. Idempotent."""
        ...

    async def result(self, handle: JobHandle) -> JobResult:
        """Wait for the job to end and say how it ended."""
        ...

    async def reattach(self, ref: str) -> JobHandle | None:
        """A handle for a job started earlier (maybe by another daemon process); None if unknown."""
        ...
