"""Settings: flags > environment (`ACADEMY_*`, nested with `__`) > TOML file > defaults.

Validated by pydantic; `load_settings` turns a validation error into a message that names the
setting, the environment variable and what to fix.
"""

from __future__ import annotations

import os
import re
from datetime import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "ACADEMY_"


class SettingsError(Exception):
    """A setting is wrong; the message says which one and how to fix it."""


class QuietHours(BaseModel):
    """A daily window (local to `tz`, default UTC) in which no training starts, e.g. "22:00-06:00"."""

    start: time
    end: time

    @classmethod
    def parse(cls, value: str) -> QuietHours:
        m = re.fullmatch(r"\s*(\d{1,2}:\d{2})\s*-\s*(\d{1,2}:\d{2})\s*", value)
        if not m:
            raise ValueError(f"quiet hours must look like '22:00-06:00', got {value!r}")
        return cls(start=time.fromisoformat(m.group(1).zfill(5)), end=time.fromisoformat(m.group(2).zfill(5)))


class NatsSettings(BaseModel):
    url: str | None = Field(
        default=None,
        description="Join this NATS server, or a cluster: several URLs separated by commas; unset: start the "
        "bundled nats-server (embedded).",
    )
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    inbox_prefix: str = Field(
        default="_INBOX", description="Prefix of the daemon's reply subjects (the embedded server gives it "
        "_INBOX_academyd, which agents cannot subscribe to).")
    embedded_port: int = Field(default=4222, ge=0, le=65535, description="0 picks a free port.")
    embedded_monitor_port: int = Field(default=0, ge=0, le=65535, description="0 disables monitoring.")
    inbound_stream: str = "ACADEMY_INBOUND"
    outbound_stream: str = "ACADEMY_EVENTS"
    dlq_stream: str = "ACADEMY_DLQ"
    consumer: str = "academyd"
    ack_wait_s: float = Field(default=30.0, gt=0)
    max_deliver: int = Field(default=8, ge=2, description="Tries a message gets before it is dead-lettered.")
    store_fault_redeliveries: int = Field(
        default=200, ge=0,
        description="Deliveries a store fault (locked, disk full) may add to a message beyond max_deliver; "
        "they do not count as tries. The consumer's server-side max_deliver is the sum.",
    )
    backoff_s: list[float] = Field(default_factory=lambda: [1.0, 5.0, 30.0, 120.0])
    fetch_batch: int = Field(default=256, ge=1, le=10_000)
    fetch_timeout_s: float = Field(default=0.5, gt=0)
    max_payload_bytes: int = Field(default=1024 * 1024, ge=1024)
    duplicate_window_s: float = Field(default=120.0, gt=0)
    replicas: int = Field(
        default=1, ge=1, le=5, description="Replicas of every stream and bucket the Academy creates (3 on a cluster)."
    )

    @property
    def servers(self) -> list[str]:
        """`url` as the list of server URLs it names (one, or a cluster's, comma-separated)."""
        return [u.strip() for u in (self.url or "").split(",") if u.strip()]

    @field_validator("backoff_s")
    @classmethod
    def _backoff_positive(cls, v: list[float]) -> list[float]:
        if any(x <= 0 for x in v):
            raise ValueError("every backoff step must be > 0 seconds")
        return v

    @model_validator(mode="after")
    def _auth_consistent(self) -> NatsSettings:
        if (self.user is None) != (self.password is None):
            raise ValueError("nats.user and nats.password go together: set both or neither")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("nats.tls_cert and nats.tls_key go together: set both or neither")
        if self.backoff_s and len(self.backoff_s) > self.max_deliver:
            raise ValueError("nats.backoff_s may have at most nats.max_deliver steps")
        return self


class PolicySettings(BaseModel):
    min_lessons: int = Field(default=100, ge=1, description="New successful lessons needed to train.")
    min_interval_h: float = Field(default=24.0, ge=0, description="Hours since the last training.")
    quiet_hours: QuietHours | None = None
    tick_minutes: float = Field(default=10.0, gt=0, description="How often the policy is re-checked.")
    retry_backoff_min: list[float] = Field(
        default_factory=lambda: [10.0, 60.0, 360.0], description="Minutes to wait after 1, 2, 3+ failed runs."
    )

    @field_validator("quiet_hours", mode="before")
    @classmethod
    def _parse_quiet(cls, v: Any) -> Any:
        if isinstance(v, str):
            return None if not v.strip() else QuietHours.parse(v)
        return v


class ParaphraserSettings(BaseModel):
    """A model that restates training lessons (academyd.curator.paraphrase): any OpenAI-compatible chat
    endpoint, e.g. Venom's own runtime or the Academy's llama.cpp endpoint. Unset `url`: none is asked."""

    url: str | None = Field(
        default=None, description="The endpoint's OpenAI base URL (http://127.0.0.1:8080/v1; "
        "/chat/completions is added) or its full chat completions URL. Unset: no paraphraser.",
    )
    model: str = Field(default="base", min_length=1, description="The model name sent in each request.")
    api_key_env: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="The NAME of an environment variable holding the API key (sent as a Bearer token); the "
        "key itself is never a setting, logged, or written.",
    )
    questions_per_lesson: int = Field(default=3, ge=0, le=16, description="Restated questions asked per lesson.")
    answers_per_lesson: int = Field(default=1, ge=0, le=8, description="Restated answers asked per lesson.")
    timeout_s: float = Field(default=60.0, gt=0, description="One request.")
    max_tries: int = Field(default=3, ge=1, le=10, description="Tries of a request on a transient error.")
    max_requests: int = Field(
        default=600, ge=0, description="Requests per build (cached answers are free): bounds the time a build "
        "can spend on a slow model; lessons past it get templates only.",
    )
    temperature: float = Field(default=0.5, ge=0.0, le=2.0, description="Sampling; each variant has its own seed.")
    max_tokens: int = Field(default=64, ge=8, le=1024)
    max_chars: int = Field(default=300, ge=20, description="Longer restatements are rejected.")

    @field_validator("url")
    @classmethod
    def _no_credentials_in_url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(v.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"the paraphraser URL must be http(s)://host[:port]/..., got {v!r}")
        if parts.username or parts.password:
            raise ValueError("the paraphraser URL must not carry credentials (they would be written to the "
                             "manifest): put the key in an environment variable and name it in api_key_env")
        return v.strip()


class CuratorSettings(BaseModel):
    """Dataset curation (see academyd.curator)."""

    format: Literal["alpaca", "sharegpt"] = "alpaca"
    heldout_fraction: float = Field(default=0.10, ge=0.0, lt=1.0)
    min_examples: int = Field(default=50, ge=1)
    replay_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    secrets: Literal["redact", "drop"] = "redact"
    near_dup_threshold: float = Field(default=0.8, gt=0.0, le=1.0)
    diff_truncate_chars: int = Field(default=1500, ge=100)
    diff_drop_chars: int = Field(default=3000, ge=100)
    max_example_chars: int = Field(default=8000, ge=100)
    min_example_chars: int = Field(default=20, ge=0)
    commit_message_min_chars: int = Field(default=10, ge=1, description="Shorter commit messages are dropped.")
    commit_message_min_words: int = Field(default=3, ge=1, description="Subjects with fewer words are dropped.")
    commit_message_max_chars: int = Field(default=1000, ge=20, description="Longer commit messages are dropped.")
    scope: Literal["all", "new"] = Field(
        default="all",
        description="all: every record that passes; new: only records no earlier dataset trained on, plus "
        "replay_fraction x that many earlier training examples (against forgetting).",
    )
    shingle_chars: int = Field(default=5, ge=2, le=16, description="Character shingle size for near-duplicates.")
    num_perm: int = Field(default=64, ge=16, le=512, description="MinHash permutations (LSH candidates only).")
    system_prompt: str = Field(
        default="You are Venom, a helpful local AI assistant.", min_length=1,
        description="The system prompt Venom sends with its chat: lessons are trained as that chat exchange "
        "(the question as the user's turn, the answer as the assistant's) and the arena asks with it.",
    )
    family_threshold: float = Field(
        default=0.7, gt=0.0, le=1.0,
        description="Questions this similar (Jaccard of character shingles, the prompt alone) are one family: "
        "a family is held out or trained on whole.",
    )
    validation_families: int = Field(
        default=0, ge=0, le=16,
        description="Lesson families set aside as validation (academyd.curator.validation): never trained on, "
        "never the gate's held-out ones; the trainer keeps the step with the most right answers to them inside "
        "training.hyperparameters.kl_budget (measured every kl_steps). At most a quarter of the new lesson "
        "families; 0 (the default): none, the trainer keeps the last step inside the budget.",
    )
    validation_questions: int = Field(
        default=8, ge=1, le=16,
        description="Validation questions at most (one per family first): each is answered at every KL measurement.",
    )
    augment: bool = Field(
        default=True,
        description="Add template restatements of each training lesson (academyd.curator.augment: other "
        "phrasings, statements, cloze, reverse pairs, Polish and English), in the lesson's family; a restatement "
        "near a held-out question is dropped. Part of the default recipe (TrainingSettings, README).",
    )
    augment_per_kind: int = Field(default=1, ge=1, le=16, description="Restatements per kind and language.")
    paraphraser: ParaphraserSettings = Field(
        default_factory=ParaphraserSettings,
        description="Restatements from a model as well (academyd.curator.paraphrase), cached by content hash; "
        "used when its url is set, with or without the templates (augment).",
    )
    decontamination_threshold: float = Field(
        default=0.7, gt=0.0, le=1.0,
        description="A held-out question this similar to a training question (exact Jaccard, after LSH) is moved "
        "to training with its family: the check that the family split held (LSH misses, splits remembered from "
        "before families). Lower it to be stricter; short templated prompts then all look alike.",
    )


class TrainingSettings(BaseModel):
    """The habitat and the trainer (see academyd.habitat, academyd.trainer)."""

    autorun: bool = Field(
        default=True,
        description="Train on this daemon's host (the habitat below); false: never here: a requested run "
        "waits, recorded, until an `academyd worker` is connected and then trains there (the nats habitat).",
    )
    habitat: Literal["auto", "process", "docker", "nats"] = Field(
        default="auto",
        description="auto: `academyd worker` processes when any is connected, else Docker when its engine "
        "answers, else a local process; nats: only workers.",
    )
    trainer_python: Path | None = Field(
        default=None, description="Interpreter of the trainer environment (default: .venv-trainer/bin/python)."
    )
    base_model: str = Field(
        default="smollm2-135m-instruct",
        description="The base model adapters are trained on: smollm2-135m-instruct (the bundled SmolLM2 GGUF), "
        "a .gguf file, a model directory, or a hub name in the local Hugging Face cache (academyd.basemodel).",
    )
    docker_image: str = Field(
        default="", description="The trainer image, pinned by digest (repo@sha256:..., or a local image id "
        "sha256:...); a tag can move under you. Unset: the Docker habitat is not used.")
    docker_url: str | None = None
    docker_python: str = Field(
        default="python", description="The trainer's interpreter inside the Docker image (it needs torch/Unsloth)."
    )
    docker_user: str | None = Field(
        default=None,
        description="uid:gid the trainer runs as in the container (never root); unset: the daemon's own "
        "uid:gid, or 65534:65534 (nobody) when the daemon runs as root.",
    )
    docker_cpus: float = Field(
        default=0.0, ge=0, description="CPUs the container may use; 0: all of the engine's CPUs but one.")
    docker_memory_mb: int = Field(
        default=0, ge=0, description="The container's memory limit when training.memory_limit_mb is 0; "
        "0: three quarters of the engine's memory.")
    docker_pids_limit: int = Field(default=4096, ge=0, description="Processes/threads in the container; 0: no limit.")
    docker_shm_mb: int = Field(default=1024, ge=64, description="Size of the container's /dev/shm.")
    docker_mounts: list[str] = Field(
        default_factory=list,
        description="Extra read-only mounts, HOST[:CONTAINER] (a Hugging Face cache, a trainer environment).",
    )
    time_limit_s: float = Field(default=6 * 3600, gt=0)
    memory_limit_mb: int = Field(default=0, ge=0, description="0: no limit.")
    # The default recipe, for a real model (SmolLM2-135M): the curator's template restatements (one per kind
    # and language, CuratorSettings.augment), 1.5 passes at lr 2e-3, replay rows 0.3 x the dataset (about as
    # many as the lessons), learnt by KL to the base (hyperparameters.replay_loss). Chosen on the tuning set
    # (tests/fixtures/house.py, bench/bench_recipe.py, issue 21; README "Default recipe"): the arm with the
    # most right answers to hard phrasings inside the forgetting budget over 3 seeds (10/8/7, mean 8.3, vs
    # 9/6/6 for the earlier three passes at 2e-3 without restatements, about the same compute), at about twice
    # its KL (0.19-0.26 vs 0.09-0.13) and a general-set loss change of -5.6 to +0.04 %. A hyperparameters
    # entry wins over these.
    epochs: float | None = Field(
        default=1.5, gt=0, description="Passes over the dataset (with replay); None: the trainer's default (3).")
    learning_rate: float | None = Field(
        default=2e-3, gt=0, lt=1, description="LoRA learning rate; None: the trainer's default (2e-4, Venom's).")
    max_seq_length: int | None = None
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimiser steps.")
    replay_general: float = Field(
        default=0.3, ge=0.0, le=4.0,
        description="Against forgetting: add this fraction of the dataset's size as the base model's own answers "
        "to general prompts (self-distillation, chat rendering); 0: off. A hyperparameters entry wins.",
    )
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the trainer's hyperparameters (lora_r, batch_size, "
        "adapter lora|mica, use_rslora, ...); adapters llama.cpp cannot serve are refused here.",
    )
    cpu_threads: int | None = Field(
        default=None, ge=1, description="torch threads in the trainer; None: the CPUs free when it starts "
        "(affinity, cgroup quota, less those other work keeps busy; academyd.trainer.cpu).")
    seed: int = 3407
    backend: Literal["auto", "unsloth", "peft"] = "auto"
    render: Literal["chat", "plain"] = Field(
        default="chat",
        description="chat: train every example through the base model's chat template (what serves); plain: "
        "the dataset file's own prompt form (Alpaca's ### Instruction).",
    )
    progress_per_s: float = Field(default=2.0, gt=0, description="Throttle of academy.training.progress.")

    @field_validator("docker_image")
    @classmethod
    def _image_by_digest(cls, v: str) -> str:
        return _check_image(v)

    @field_validator("hyperparameters")
    @classmethod
    def _servable_adapter(cls, v: dict[str, Any]) -> dict[str, Any]:
        from academyd.trainer.spec import ADAPTERS, unservable

        problems = unservable(v)
        if "adapter" in v and v["adapter"] not in ADAPTERS:
            problems.append(f"adapter must be one of {', '.join(ADAPTERS)}, got {v['adapter']!r}")
        if problems:
            raise ValueError("this adapter could not be served: " + "; ".join(problems))
        return v


class WorkersSettings(BaseModel):
    """Training on `academyd worker` processes over NATS (see academyd.habitat.nats, academyd.worker)."""

    jobs_stream: str = "ACADEMY_JOBS"
    events_stream: str = "ACADEMY_JOB_EVENTS"
    artifacts_bucket: str = "academy_artifacts"
    registry_bucket: str = Field(default="academy_workers", description="KV: what each connected worker has.")
    leases_bucket: str = Field(default="academy_leases", description="KV: which worker holds which job.")
    ack_wait_s: float = Field(
        default=60.0, ge=2.0,
        description="A job whose worker stops heartbeating goes to another worker after this long.",
    )
    require_gpu: bool = Field(default=False, description="Jobs wait for a worker with a GPU.")
    artifacts_ttl_h: float = Field(default=7 * 24.0, gt=0, description="Objects older than this are dropped.")
    slow_transfers: dict[str, float] = Field(
        default_factory=dict,
        description="Testing a slow link: a worker's transfer whose '<get|put>:<object name>' matches a pattern "
        "(fnmatch, e.g. 'get:runs/*/ckpt/*') takes that many seconds longer. Empty in production.",
    )

    @property
    def heartbeat_s(self) -> float:
        """In-progress acks, lease refreshes and advertisements: four per ack wait."""
        return self.ack_wait_s / 4


_DIGEST = re.compile(r"(?:[^\s@]+@)?sha256:[0-9a-f]{64}")


def _check_image(value: str) -> str:
    if value and not _DIGEST.fullmatch(value.strip()):
        raise ValueError(f"{value!r} is not pinned by digest: name the image as repo@sha256:<digest> "
                         "(docker inspect --format '{{index .RepoDigests 0}}' IMAGE) or by its local id "
                         "sha256:<id>, not by a tag that can move")
    return value.strip()


class ArenaSettings(BaseModel):
    """Evaluation gate and post-promotion watch (see academyd.arena)."""

    bootstrap_samples: int = Field(default=2000, ge=100)
    generation_sample: int = Field(default=16, ge=0)
    generation_tolerance: float = Field(default=0.02, ge=0.0)
    forgetting_tolerance: float = Field(default=0.05, ge=0.0)
    judge_url: str | None = None
    judge_model: str | None = None
    ollama_url: str | None = None
    watch_window: int = Field(default=50, ge=5)
    watch_alpha: float = Field(default=0.05, gt=0.0, lt=1.0)
    watch_margin: float = Field(default=0.05, ge=0.0)
    watch_debounce_s: float = Field(
        default=5.0, ge=0.0, description="The watch waits this long after task.completed arrives, then checks once."
    )
    watch_cooldown_min: float = Field(
        default=60.0, ge=0.0, description="After an automatic rollback (done or refused) the watch waits this long."
    )
    auto_promote: bool = True
    min_heldout_families: int = Field(
        default=8, ge=1,
        description="Held-out families (questions never trained on) needed before a verdict; fewer: the run ends "
        "'insufficient evidence' and the champion stays. The curator holds out at least this many per source "
        "(up to a quarter of its families).",
    )
    right_answers_alpha: float = Field(
        default=0.05, gt=0.0, lt=1.0,
        description="Promotion needs more right answers than the champion on held-out families, significant at "
        "this level (one-sided exact sign test over families).",
    )
    collapse_min_diversity: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="Refuse a candidate whose distinct answers are fewer than this share of the references' own.",
    )
    collapse_max_dominant: float = Field(
        default=0.3, ge=0.0, le=1.0,
        description="Refuse a candidate that gives one fact to more than this share of questions about others.",
    )
    answer_sample: int = Field(
        default=64, ge=0, description="Checkable held-out questions asked through the serving artifact (at most)."
    )
    eval_time_limit_s: float = Field(default=3600.0, gt=0, description="Limit of one arena measurement.")
    where: Literal["local", "worker"] = Field(
        default="local",
        description="Where the arena's measurement (and the GGUF export it makes) runs: local, in the trainer "
        "environment on the daemon's host; worker, as a job for an `academyd worker` (docs/scale-out.md). The "
        "gate decides on the daemon either way.",
    )
    require_gpu: bool | None = Field(
        default=None, description="arena.where = worker: the job waits for a worker with a GPU (unset: as "
        "workers.require_gpu).",
    )
    max_new_tokens: int = Field(default=64, ge=1, description="Generation length of the arena's sample.")
    seed: int = Field(default=0, description="Seed of the generation sample and the bootstrap.")
    cpu_threads: int | None = Field(
        default=None, ge=1,
        description="torch threads of the measurement; unset: the CPUs left free when it starts, as the trainer "
        "chooses (academyd.trainer.cpu), with threads that sleep instead of spinning.")
    gguf: bool = Field(default=True, description="Write a GGUF adapter on promotion (llama/mistral/qwen2/qwen3).")
    runtime: Literal["llamacpp", "none"] = Field(
        default="llamacpp",
        description="Judge the served artifact too: the GGUF adapter on the GGUF base in llama.cpp.",
    )
    served_agreement_min: float = Field(
        default=0.85, ge=0.0, le=1.0,
        description="Least teacher-forced top-1 agreement of llama.cpp with the trainer's greedy answers "
        "(measured in tests/arena/test_served.py: the correct artifact 0.99, wrong ones 0.50 or less).",
    )
    general_answer_tolerance: float = Field(
        default=0.05, ge=0.0, description="How much lower (chrF/100) the candidate's general answers may score than the base's.",
    )
    general_sample: int = Field(default=12, ge=0, description="General questions answered in the runtime.")
    ollama_base: str | None = Field(
        default=None, description="Ollama name of the base model for FROM (default: training.base_model)."
    )
    ollama_timeout_s: float = Field(default=600.0, gt=0)
    judge_timeout_s: float = Field(default=120.0, gt=0)
    modelfile_parameters: dict[str, Any] = Field(
        default_factory=lambda: {"temperature": 0.7, "top_p": 0.9, "num_ctx": 4096},
        description="PARAMETER lines of the Modelfile (the tokenizer's EOS is added as a stop).",
    )


class OutboxSettings(BaseModel):
    """The outbox relay (see academyd.outbox)."""

    max_attempts: int = Field(
        default=10, ge=1, description="Publishes the server refused (too large, no stream) before a row is parked, "
        "with its error. A transient failure (timeout, no leader, lost quorum) is retried for ever, never counted.",
    )
    retention_h: float = Field(default=168.0, gt=0, description="Published rows are deleted after this many hours.")
    backoff_s: float = Field(default=1.0, gt=0, description="Wait after a transient publish failure; doubles.")
    backoff_max_s: float = Field(default=30.0, gt=0, description="The longest wait between tries in an outage.")


class SupervisionSettings(BaseModel):
    """How the daemon's long-running tasks are restarted when they die (see academyd.supervise)."""

    restart_backoff_s: float = Field(default=1.0, gt=0, description="Wait before the first restart; doubles.")
    restart_backoff_max_s: float = Field(default=60.0, gt=0, description="The longest wait between restarts.")
    healthy_after_s: float = Field(
        default=30.0, gt=0, description="A restarted task counts as healthy again after running this long.")


class FollowerSettings(BaseModel):
    """The serving side of the hot swap: `academyd follow` (see academyd.follower)."""

    target: Literal["llamacpp", "ollama", "venom"] = "llamacpp"
    consumer: str = Field(default="academy-follower", description="Durable consumer on the outbound stream.")
    ack_wait_s: float = Field(default=60.0, gt=0, description="Redelivery after this long without progress.")
    min_agreement: float = Field(
        default=0.67, ge=0.0, le=1.0,
        description="Share of probe prompts whose answer must equal the arena's (greedy) for the swap.",
    )
    probe_max_tokens: int = Field(default=48, ge=1)
    probe_file: Path | None = Field(
        default=None, description="Probe prompts when a version brings none (JSON list of {messages, expected}).",
    )
    require_base_identity: bool = Field(
        default=True, description="Refuse an adapter whose GGUF does not name its base (general.base_model.*); "
        "every adapter the Academy exports names it (false only for adapters made elsewhere).",
    )
    endpoint_url: str | None = Field(
        default=None, description="llamacpp: a running endpoint (python -m academyd.follower.endpoint); "
        "unset: the follower starts one on base_gguf.",
    )
    base_gguf: Path | None = Field(
        default=None, description="The base model GGUF the runtime serves (llamacpp: the endpoint loads it; every "
        "target: the base identity adapters are checked against). Unset: training.base_model when that is a GGUF "
        "(the default SmolLM2 is).",
    )
    runtime_python: Path | None = Field(
        default=None, description="llamacpp: an interpreter with llama-cpp-python (default: the trainer's).",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535, description="llamacpp: the endpoint's port (0: a free one).")
    threads: int | None = Field(default=None, ge=1, description="llamacpp: llama.cpp threads.")
    served_name: str = Field(default="academy", description="The model name Venom asks the endpoint for.")
    ollama_url: str | None = None
    ollama_alias: str = Field(default="venom-academy", description="ollama: the tag Venom asks for.")
    ollama_base: str | None = Field(default=None, description="ollama: the base model's Ollama name.")
    ollama_serve: Literal["auto", "merged", "adapter"] = Field(
        default="auto", description="ollama: how a version is created. auto: from Ollama's /api/version, "
        "an adapter model before 0.34.1, a merged model (the LoRA merged into the base GGUF) from 0.34.1 on, "
        "which refuses new adapter models; merged: always merged; adapter: always the adapter layer.",
    )
    ollama_merge_type: Literal["q8_0", "f16"] = Field(
        default="q8_0", description="ollama: the storage type of the merged weights (never 4-bit, which rounds "
        "a LoRA's small deltas away).",
    )
    venom_url: str | None = Field(default=None, description="venom: Venom's API, e.g. http://127.0.0.1:8000.")
    venom_runtime_id: Literal["ollama", "vllm", "onnx"] | None = Field(
        default=None, description="venom: the chat runtime Venom deploys to (activate's runtime_id; required).",
    )
    venom_model_id: str | None = Field(
        default=None, description="venom: the base model as Venom's runtime names it (activate's model_id, e.g. "
        "smollm2:135m; required). Deactivating must bring chat back to it.",
    )
    venom_base_models: dict[str, str] = Field(
        default_factory=dict, description="venom: the Academy's base model (training.base_model, or its file "
        "name) -> the name Venom knows it by, written as metadata.json's base_model (Venom refuses a deploy "
        "whose metadata base differs from model_id). Must name training.base_model.",
    )
    venom_chat_url: str | None = Field(
        default=None, description="venom: the runtime's OpenAI-compatible chat URL (Ollama: "
        "http://127.0.0.1:11434/v1/chat/completions); the probe asks it for the chat_model Venom's reply names.",
    )
    timeout_s: float = Field(default=120.0, gt=0, description="One HTTP call to the runtime.")
    reconcile_interval_s: float = Field(
        default=60.0, gt=0, description="The timer: this often the follower reads the desired state from the daemon "
        "and converges the runtime on it; also the longest wait between tries while the runtime is down.",
    )
    retry_initial_s: float = Field(default=1.0, gt=0, description="First wait after a failed try; doubles.")
    max_tries: int = Field(
        default=5, ge=1, description="Tries of an event (or a generation) that fails unexpectedly before it is "
        "dead-lettered; an unreachable runtime is retried for ever instead.",
    )

    def venom_base_for(self, base_model: str) -> str | None:
        """The name Venom knows `base_model` by (exact key, else the key equal to its file name)."""
        if base_model in self.venom_base_models:
            return self.venom_base_models[base_model]
        return self.venom_base_models.get(Path(base_model).name)

    @model_validator(mode="after")
    def _venom_complete(self) -> FollowerSettings:
        if self.target == "venom":
            missing = [k for k in ("venom_url", "venom_runtime_id", "venom_model_id", "venom_chat_url")
                       if not getattr(self, k)]
            if not self.venom_base_models:
                missing.append("venom_base_models")
            if missing:
                raise ValueError("follower.target = venom needs " + ", ".join(f"follower.{k}" for k in missing)
                                 + " (docs/follower.md: Venom refuses a deploy without runtime_id and model_id, "
                                 "and one whose metadata.json names another base)")
        return self


class WatchSettings(BaseModel):
    """The anytime-valid post-promotion watch (academyd.anytime, academyd.champion.monitor) and what a task's
    outcome is (#20)."""

    alpha: float = Field(default=0.05, gt=0.0, lt=0.5, description="Error rate of both decisions (rollback, "
                         "confirmation), however often the watch looks.")
    rollback_margin: float = Field(default=0.0, ge=0.0, lt=1.0, description="A champion is rolled back when "
                                   "its success rate is below its parent's by more than this.")
    confirm_margin: float = Field(default=0.10, ge=0.0, lt=1.0, description="A champion is confirmed when it "
                                  "is no worse than its parent minus this.")
    parent_tasks: int = Field(default=1000, ge=10, description="The parent's latest tasks that make its record.")
    thumbs_override: bool = Field(default=True, description="A thumbs up/down (feedback.given) is the task's "
                                  "outcome, instead of its status.")
    guard_failed_run: int = Field(default=10, ge=2, description="This many failed or empty answers in a row "
                                  "roll the champion back at once.")
    guard_leaks: int = Field(default=1, ge=1, description="This many answers with a chat-template token "
                             "roll the champion back at once.")
    leak_markers: list[str] = Field(default_factory=lambda: [
        "<|im_start|>", "<|im_end|>", "### Response:", "### Instruction:", "<|endoftext|>",
        "<|start_header_id|>", "<|eot_id|>", "[INST]"])
    interval_s: float = Field(default=60.0, gt=0.0, description="The watch's APScheduler tick.")


class BridgeSettings(BaseModel):
    """`academyd bridge-venom`: follows Venom's data directory (academyd.bridge)."""

    poll_s: float = Field(default=1.0, gt=0.0, description="How often the files are looked at (stat only).")
    max_per_s: float = Field(default=200.0, gt=0.0, description="Events published per second at most.")
    cursor: Path | None = Field(default=None, description="The bridge's cursor file (default "
                                "<data_dir>/bridge/<hash of the Venom directory>.json).")


class HttpSettings(BaseModel):
    """The Academy page and /metrics."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    token: str | None = Field(default=None, description="Required for anything that changes state.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    data_dir: Path = Field(default=Path("data"), description="SQLite store, datasets, models, NATS store.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
    repos: dict[str, Path] = Field(
        default_factory=dict, description="Allowlist of git repositories: name -> local path."
    )
    nats: NatsSettings = Field(default_factory=NatsSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    curator: CuratorSettings = Field(default_factory=CuratorSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    arena: ArenaSettings = Field(default_factory=ArenaSettings)
    workers: WorkersSettings = Field(default_factory=WorkersSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    supervision: SupervisionSettings = Field(default_factory=SupervisionSettings)
    follower: FollowerSettings = Field(default_factory=FollowerSettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)
    bridge: BridgeSettings = Field(default_factory=BridgeSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("toml_file"):
            sources.append(TomlConfigSettingsSource(settings_cls))
        return tuple(sources)

    @model_validator(mode="after")
    def _absolute_paths(self) -> Settings:
        # Resolved once, here, against the working directory the daemon was started in: a relative path
        # handed on (to the trainer, which runs in its own directory; into model.promoted) means nothing.
        self.data_dir = absolute(self.data_dir)
        self.repos = {name: absolute(p) for name, p in self.repos.items()}
        n = self.nats
        for key in ("creds_file", "tls_ca", "tls_cert", "tls_key"):
            if getattr(n, key) is not None:
                setattr(n, key, absolute(getattr(n, key)))
        t = self.training
        if t.trainer_python is not None:
            t.trainer_python = absolute(t.trainer_python)
        t.base_model = local_or_name(t.base_model)
        t.docker_mounts = [_absolute_mount(m) for m in t.docker_mounts]
        if self.curator.validation_families and int(t.hyperparameters.get("kl_steps") or 0) < 1:
            # the families would be kept out of training and never asked: lessons lost for nothing
            raise ValueError("curator.validation_families needs training.hyperparameters.kl_steps >= 1 (how often "
                             "the trainer asks them); without it set curator.validation_families to 0")
        f = self.follower
        if f.target == "venom" and f.venom_base_for(t.base_model) is None:
            raise ValueError(f"follower.venom_base_models names no Venom model for training.base_model "
                             f"{t.base_model!r}: add it (the name Venom's runtime knows this base by, e.g. "
                             f"{{{Path(t.base_model).name!r} = {f.venom_model_id!r}}})")
        return self

    # Derived paths: one place decides the data layout.
    @property
    def db_path(self) -> Path:
        return self.data_dir / "academy.db"

    @property
    def training_dir(self) -> Path:
        return self.data_dir / "training"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def nats_dir(self) -> Path:
        return self.data_dir / "nats"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def follower_dir(self) -> Path:
        return self.data_dir / "follower"

    @property
    def active_adapter_path(self) -> Path:
        return self.data_dir / "active_adapter.json"


def absolute(path: Path) -> Path:
    """`path` made absolute against the working directory, `~` expanded, `..` folded; symlinks are kept
    (a virtual environment's `bin/python` is a symlink whose target is not that environment)."""
    return Path(os.path.abspath(path.expanduser()))


def local_or_name(model: str) -> str:
    """A base model given as a relative path that exists becomes absolute; a hub name stays as it is."""
    if not model:
        return model
    p = Path(model).expanduser()
    if p.is_absolute():
        return str(absolute(p))
    if model.startswith((".", "~")) or p.exists():
        return str(absolute(p))
    return model


def _absolute_mount(spec: str) -> str:
    host, sep, rest = spec.partition(":")
    return str(absolute(Path(host))) + sep + rest if host else spec


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()))
    env = ENV_PREFIX + "__".join(str(p) for p in err.get("loc", ())).upper()
    return f"  - {loc or '(settings)'}: {err.get('msg')} (flag or env {env}, or [{loc}] in the TOML file)"


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings; `overrides` are what flags said (None means: not given)."""
    if config_file is None and os.environ.get(f"{ENV_PREFIX}CONFIG"):
        config_file = Path(os.environ[f"{ENV_PREFIX}CONFIG"])
    cls: type[Settings] = Settings
    if config_file is not None:
        if not config_file.is_file():
            raise SettingsError(f"config file {config_file} does not exist; pass an existing TOML file")

        class _FromFile(Settings):
            model_config = SettingsConfigDict(**{**Settings.model_config, "toml_file": config_file})

        cls = _FromFile
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return cls(**given)
    except ValidationError as exc:
        lines = "\n".join(_describe(e) for e in exc.errors())
        raise SettingsError(f"invalid settings:\n{lines}") from None
