"""The wire contract: one pydantic model per subject.

Every event carries `schema_version` (1) and an `event_id`; publishers set the `Nats-Msg-Id` header to
the event id so that a re-publish inside the server's duplicate window is dropped. Unknown fields are
rejected on inbound subjects so that a typo in a hand-written `nats pub` fails loudly (to the DLQ)
instead of being silently ignored.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1
# Longest text field accepted (characters). A payload under the size limit can still carry one field of
# hundreds of kilobytes; nothing useful for training is that long, and it is rejected with the field named.
TEXT_MAX = 64 * 1024
LONG_TEXT_MAX = 256 * 1024

# A model version's name: v1, v2, ... (the registry numbers them). The one pattern: the command schema, the
# CLI, the page and the arena check names against it; ASCII digits only (a name becomes a directory).
VERSION_PATTERN = r"v[0-9]+"
VERSION_RE = re.compile(VERSION_PATTERN)


def is_version(name: str) -> bool:
    return VERSION_RE.fullmatch(name) is not None


def version_name(seq: int) -> str:
    return f"v{seq}"


EventId = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:\-]+$", description="Unique id of this event.")


class Event(BaseModel):
    """Base of every payload on the bus."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    schema_version: Literal[1] = Field(description="Version of this contract; only 1 exists.")
    event_id: str = EventId

    # Fields that hold JSON objects (the ingestor counts their keys to spot duplicate keys cheaply).
    NESTED_FIELDS: ClassVar[tuple[str, ...]] = ()


# ---------------------------------------------------------------- inbound


class LessonCreated(Event):
    """`lesson.created`: Venom's Lesson, field for field."""

    NESTED_FIELDS: ClassVar[tuple[str, ...]] = ("metadata",)

    lesson_id: str = Field(min_length=1, max_length=200)
    timestamp: datetime = Field(description="ISO 8601; Venom writes naive local time.")
    situation: str = Field(max_length=TEXT_MAX)
    action: str = Field(max_length=TEXT_MAX)
    result: str = Field(max_length=TEXT_MAX)
    feedback: str | None = Field(default=None, max_length=TEXT_MAX)
    tags: list[Annotated[str, Field(max_length=200)]] = Field(default_factory=list, max_length=100)
    metadata: dict[str, Any] = Field(default_factory=dict)


class CommitPushed(Event):
    """`commit.pushed`: a commit in a repository named in the daemon's allowlist."""

    repo: str = Field(min_length=1, max_length=200, description="A name from the configured repo allowlist.")
    sha: str = Field(pattern=r"^[0-9a-fA-F]{7,64}$")
    branch: str = Field(min_length=1, max_length=500)
    message: str | None = Field(default=None, max_length=TEXT_MAX)
    author: str | None = Field(default=None, max_length=500)
    pushed_at: datetime | None = None


class ContextUsed(BaseModel):
    """Venom's `ContextUsed`: the lessons and memory entries a task was given."""

    model_config = ConfigDict(extra="allow")

    lessons: list[str] = Field(default_factory=list)
    memory_entries: list[str] = Field(default_factory=list)


class TaskCompleted(Event):
    """`task.completed`: Venom's finished task, as `VenomTask.model_dump(mode="json")` writes it.

    Venom's `id` is accepted for `task_id`; `context_history` is Venom's dict (a list of turns is accepted
    too); Venom's statuses are PENDING, PROCESSING, COMPLETED and FAILED.
    """

    NESTED_FIELDS: ClassVar[tuple[str, ...]] = ("context_history", "context_used")

    task_id: str = Field(min_length=1, max_length=200, validation_alias=AliasChoices("task_id", "id"),
                         description="The task's id (Venom: `id`, a UUID).")
    content: str = Field(max_length=TEXT_MAX, description="The request.")
    result: str | None = Field(default=None, max_length=LONG_TEXT_MAX)
    status: str = Field(min_length=1, max_length=50, description="Venom's TaskStatus: COMPLETED or FAILED "
                        "(PENDING, PROCESSING are accepted; a task counts as a success when COMPLETED).")
    created_at: datetime | None = Field(default=None, description="ISO 8601; naive means UTC (as in Venom).")
    logs: list[Annotated[str, Field(max_length=TEXT_MAX)]] = Field(default_factory=list, max_length=1000)
    context_history: dict[str, Any] | list[dict[str, Any]] | None = Field(
        default=None, description="Venom's context dict (its `session_history` turns feed the dataset).")
    context_used: ContextUsed | None = None
    model_version: str | None = Field(default=None, description="The model/adapter version that served it.")

    @field_validator("status")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.strip().upper().removeprefix("TASKSTATUS.")


class FeedbackGiven(Event):
    """`feedback.given`: a thumbs up or down on a task, as Venom appends it to `data/feedback/feedback.jsonl`
    (no model field: it is joined to the task, and so to the version that served it, by `task_id`)."""

    task_id: str = Field(min_length=1, max_length=200)
    rating: Literal["up", "down"]
    timestamp: datetime | None = Field(default=None, description="ISO 8601; naive means UTC.")
    comment: str | None = Field(default=None, max_length=TEXT_MAX)
    prompt: str | None = Field(default=None, max_length=TEXT_MAX)
    result: str | None = Field(default=None, max_length=LONG_TEXT_MAX)
    intent: str | None = Field(default=None, max_length=200)
    tool_required: bool | None = None


class PromptApproved(Event):
    """`prompt.approved`: an answer the user approved (a thumbs up), as Venom appends it to
    `data/learning/hidden_prompts.jsonl`: a prompt -> approved answer pair for curation."""

    task_id: str | None = Field(default=None, max_length=200)
    prompt: str = Field(min_length=1, max_length=TEXT_MAX)
    approved_response: str = Field(min_length=1, max_length=LONG_TEXT_MAX)
    timestamp: datetime | None = Field(default=None, description="ISO 8601; naive means UTC.")
    intent: str | None = Field(default=None, max_length=200)
    prompt_hash: str | None = Field(default=None, max_length=200)
    note: str | None = Field(default=None, max_length=TEXT_MAX)


# ---------------------------------------------------------------- commands (request/reply)


class Command(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainCommand(Command):
    force: bool = False
    reason: str = "manual"


class DatasetCommand(Command):
    reason: str = "manual"


class PromoteCommand(Command):
    version: str = Field(pattern=rf"^{VERSION_PATTERN}$")
    reason: str = "manual"


class RollbackCommand(Command):
    reason: str = "manual"


class StatusCommand(Command):
    pass


# ---------------------------------------------------------------- outbound


class OutEvent(Event):
    """Base of what the daemon publishes (through the outbox)."""

    model_config = ConfigDict(extra="allow")
    at: datetime


class TrainingRequested(OutEvent):
    run_id: str
    reason: str
    forced: bool = False
    new_lessons: int


class DatasetBuilt(OutEvent):
    dataset_id: str
    run_id: str | None = None
    format: str
    path: str
    heldout_path: str
    manifest_path: str
    content_hash: str
    examples: int
    heldout: int


class TrainingStarted(OutEvent):
    run_id: str
    habitat: str
    dataset_id: str | None = None


class TrainingProgress(OutEvent):
    run_id: str
    step: int
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    eval_loss: float | None = None
    eta_s: float | None = None


class TrainingFinished(OutEvent):
    run_id: str
    version: str | None = None
    adapter_path: str | None = None
    backend: str | None = None
    final_loss: float | None = None
    duration_s: float | None = None


class TrainingFailed(OutEvent):
    run_id: str
    reason: str
    retry_at: datetime | None = None


class EvaluationFinished(OutEvent):
    run_id: str | None = None
    version: str
    champion: str | None = None
    verdict: Literal["promote", "reject"]
    reasons: list[str] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)


class ModelPromoted(OutEvent):
    version: str
    parent_version: str | None = None
    base_model: str
    adapter_path: str
    adapter_sha256: str
    modelfile_path: str
    ollama_model: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    champion_metrics: dict[str, Any] = Field(default_factory=dict)
    reason: str
    gguf_path: str | None = Field(default=None, description="The GGUF LoRA adapter (llama.cpp, Ollama ADAPTER).")
    base_sha256: str | None = Field(
        default=None, description="sha256 of the base model file the adapter was trained on (also in the GGUF)."
    )
    base_gguf: str | None = Field(default=None, description="The base GGUF the adapter serves on, when known.")
    probes_path: str | None = Field(
        default=None, description="The arena's frozen probes (academyd.arena.runtime.read_probes) for a swap check."
    )
    generation: int | None = Field(
        default=None, ge=1, description="The desired serving state's generation (the champion move's id): every "
        "promote and rollback increases it; an event of an older generation changes nothing. Absent: older daemon.",
    )


class ModelRolledBack(OutEvent):
    from_version: str
    to_version: str | None = None
    reason: str
    generation: int | None = Field(
        default=None, ge=1, description="The desired serving state's generation (the champion move's id): every "
        "promote and rollback increases it; an event of an older generation changes nothing. Absent: older daemon.",
    )


class ProbeResult(BaseModel):
    """One frozen prompt asked of the runtime after the swap target was loaded (greedy, chat messages)."""

    model_config = ConfigDict(extra="allow")
    prompt: str = Field(description="The last user message (truncated).")
    answer: str | None = None
    expected: str | None = Field(default=None, description="What the arena's runtime answered, when known.")
    match: bool | None = None
    latency_s: float | None = None
    error: str | None = None


class Deployment(OutEvent):
    """What the follower (the serving side) did with a `model.promoted` / `model.rolled_back`."""

    source_event_id: str = Field(description="The event_id of the model.promoted / model.rolled_back handled.")
    source_subject: Literal["model.promoted", "model.rolled_back"]
    version: str | None = Field(description="The version asked for; null: the base model (no adapter).")
    target: Literal["llamacpp", "ollama", "venom"]
    runtime: str = Field(description="Where: the endpoint URL, the Ollama URL and tag, Venom's URL.")
    serving: str | None = Field(description="The version serving after this event; null: the base model.")
    previous: str | None = Field(default=None, description="The version that served before; null: the base.")
    probe: list[ProbeResult] = Field(default_factory=list)
    agreement: float | None = Field(default=None, description="Share of probe answers equal to the expected.")
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds: verify, load, probe, switch, total.")
    checks: dict[str, Any] = Field(default_factory=dict, description="sha256 and base identity, as verified.")
    generation: int | None = Field(
        default=None, description="The generation of the desired state this outcome is about (one model.deployed "
        "per generation reached).",
    )


class ModelDeployed(Deployment):
    """`model.deployed`: the runtime serves `version` now (or already did: `noop`)."""

    noop: bool = Field(default=False, description="The runtime already served this version; nothing swapped.")


class ModelDeployFailed(Deployment):
    """`model.deploy_failed`: `version` was not switched to; `serving` is what still serves."""

    reason: Literal["sha256_mismatch", "base_mismatch", "probe_failed", "load_failed", "missing_artifact",
                    "target_failed", "unknown_version", "runtime_refused", "base_unreachable", "dead_lettered"]
    detail: str
    reason_code: str | None = Field(
        default=None, description="The runtime's own code for a refusal (Venom's `reason_code`, e.g. "
        "ADAPTER_METADATA_INCOMPLETE), as it answered.",
    )


INBOUND: dict[str, type[Event]] = {
    "lesson.created": LessonCreated,
    "commit.pushed": CommitPushed,
    "task.completed": TaskCompleted,
    "feedback.given": FeedbackGiven,
    "prompt.approved": PromptApproved,
}

COMMANDS: dict[str, type[Command]] = {
    "academy.status": StatusCommand,
    "academy.cmd.train": TrainCommand,
    "academy.cmd.dataset": DatasetCommand,
    "academy.cmd.promote": PromoteCommand,
    "academy.cmd.rollback": RollbackCommand,
}

OUTBOUND: dict[str, type[OutEvent]] = {
    "academy.training.requested": TrainingRequested,
    "academy.dataset.built": DatasetBuilt,
    "academy.training.started": TrainingStarted,
    "academy.training.progress": TrainingProgress,
    "academy.training.finished": TrainingFinished,
    "academy.training.failed": TrainingFailed,
    "academy.evaluation.finished": EvaluationFinished,
    "model.promoted": ModelPromoted,
    "model.rolled_back": ModelRolledBack,
    "model.deployed": ModelDeployed,
    "model.deploy_failed": ModelDeployFailed,
}

ALL_SUBJECTS: dict[str, type[BaseModel]] = {**INBOUND, **COMMANDS, **OUTBOUND}
