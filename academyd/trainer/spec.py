"""The trainer's run spec and protocol constants: the one trainer module the daemon may import.

Standard library only (the trainer environment has no pydantic, the daemon has no torch). Both sides use:

- `TrainSpec` / `Hyperparameters`: what a run is, parsed and validated from plain JSON (`TrainSpec.from_dict`,
  `load_spec`), written back with `to_dict`.
- `spec_hash(spec)`: sha256 of the canonical spec without where it is written (`output_dir`, `run_id`).
  Two starts with the same hash are the same training, so the second resumes the first's checkpoint.
- `plan_hyperparameters(hp, n_examples=, memory_bytes=, device=)`: a pure function fitting the requested
  hyperparameters to the dataset size and the memory the trainer found. Returns a `Plan` with the reasons.
- Exit codes and event types of the trainer protocol (see `academyd.trainer.__main__`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Exit codes of `python -m academyd.trainer SPEC.json`.
EXIT_OK = 0
EXIT_BAD_INPUT = 2  # the spec, dataset or base model is wrong; retrying the same spec cannot help
EXIT_TRAINING_FAILED = 3  # training ran and failed (loss NaN/exploding, out of memory, ...)
EXIT_UNEXPECTED = 4  # a bug or an environment problem; the reason and traceback are on stderr
EXIT_CANCELLED = 5  # SIGTERM/SIGINT: stopped on request (the last checkpoint is kept for a resume)
EXIT_NAMES = {
    EXIT_OK: "ok",
    EXIT_BAD_INPUT: "bad_input",
    EXIT_TRAINING_FAILED: "training_failed",
    EXIT_UNEXPECTED: "unexpected",
    EXIT_CANCELLED: "cancelled",
}

# "type" of each line the trainer prints on stdout and appends to <output_dir>/events.jsonl.
EVENT_START = "start"
EVENT_PROGRESS = "progress"
EVENT_CHECKPOINT = "checkpoint"
EVENT_DONE = "done"
EVENT_ERROR = "error"
EVENT_TYPES = (EVENT_START, EVENT_PROGRESS, EVENT_CHECKPOINT, EVENT_DONE, EVENT_ERROR)
FINAL_EVENTS = (EVENT_DONE, EVENT_ERROR)

FORMATS = ("alpaca", "sharegpt")
RENDERS = ("chat", "plain")  # chat: through the base model's chat template (academyd.trainer.data)
BACKENDS = ("auto", "unsloth", "peft")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# lora: the usual init (A random, B zero, both trained). mica: Minor Component Adaptation (PEFT
# init_lora_weights="mica", arXiv 2604.01694): B fixed to the weight's least singular directions, only A
# trained; it saves a plain LoRA, so it exports to GGUF unchanged.
ADAPTERS = ("lora", "mica")

# Adapter settings no GGUF LoRA can carry, whatever serves it: refused up front, by the daemon's settings
# and by the spec, with the reason. (What depends on the configured runtimes, the embedding and the rank,
# is checked per run by academyd.arena.limits.)
UNSERVABLE_TARGETS = {
    "lm_head": "on a base with tied embeddings (SmolLM2: the GGUF has no output tensor, the head reads the "
               "token embedding) a LoRA on the head has no tensor to apply to in llama.cpp or Ollama",
}


def unservable(hp: dict[str, Any]) -> list[str]:
    """Reasons a hyperparameters mapping (the spec's or the settings' overrides) cannot be served. Pure."""
    problems = []
    if hp.get("use_dora"):
        problems.append("use_dora: DoRA adds a magnitude vector the GGUF LoRA format has no place for "
                        "(llama.cpp's convert_lora_to_gguf.py exits on it); use adapter 'lora' or 'mica'")
    targets = hp.get("target_modules") or ()
    for target in targets if isinstance(targets, (list, tuple)) else ():
        if target in UNSERVABLE_TARGETS:
            problems.append(f"target module {target!r}: {UNSERVABLE_TARGETS[target]}; target the attention/MLP "
                            f"projections ({', '.join(DEFAULT_TARGETS)})")
    return problems

# Output layout inside output_dir.
EVENTS_FILE = "events.jsonl"
SUMMARY_FILE = "summary.json"
LOSS_FILE = "loss.jsonl"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
SPEC_FILE = "spec.json"

GIB = 1024**3


class SpecError(ValueError):
    """The spec is invalid; the message lists every problem and how to fix it."""


@dataclass(frozen=True)
class Hyperparameters:
    """LoRA and optimiser settings. Defaults are Venom's (r 16, alpha 32, dropout 0.05, lr 2e-4, ...)."""

    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    learning_rate: float = 2e-4
    epochs: float = 3.0
    batch_size: int = 4
    grad_accumulation: int = 1
    max_length: int = 2048
    warmup_steps: int = 0
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    logging_steps: int = 1
    save_steps: int = 50  # a checkpoint every N optimiser steps (and one at the end)
    save_total_limit: int = 2
    eval_steps: int = 0  # held-out loss every N steps; 0: only before and after training
    load_in_4bit: bool = False  # QLoRA; honoured by Unsloth on a GPU only
    # Self-distillation against forgetting: this fraction of the dataset's size is added as replay
    # examples, the base model's own greedy answers to general prompts (academyd/trainer/data/
    # replay_prompts.txt, none of them in the arena's sets). Chat rendering only. 0: off.
    replay_general: float = 0.0
    # How replay rows are learnt: "kl" the base's whole next-token distribution (self-distillation with the
    # adapter off), "ce" its greedy text as labels (sharpens the model: the general set's loss rose > 20 %).
    replay_loss: str = "kl"
    adjust: bool = True  # let plan_hyperparameters fit batch/epochs to data and memory
    adapter: str = "lora"  # one of ADAPTERS
    # Forgetting as a budget: the mean KL(candidate || base) per response token on the general set (the
    # arena's, academyd/arena/data/general.jsonl), measured every kl_steps optimiser steps (0: only after
    # training) and reported as general_kl. With kl_budget > 0 only measurements inside the budget can be
    # kept, and the run stops when kl_patience measurements in a row are past it (the KL often peaks in the
    # first steps and comes back down as replay pulls the model back: one measurement past is not yet a
    # spent budget). 0: no budget.
    kl_budget: float = 0.0
    kl_steps: int = 0
    kl_patience: int = 3
    # The spec's validation questions (TrainSpec.validation) are answered greedily at each KL measurement,
    # with replies of at most this many tokens: the answer's facts come first, so a short reply is enough.
    validation_max_new_tokens: int = 32
    # rsLoRA scales by alpha/sqrt(r) instead of alpha/r. Runtimes read a plain LoRA's alpha/r, so the saved
    # adapter carries lora_alpha rewritten to alpha*sqrt(r) and use_rslora false (checkpoint.save_adapter).
    use_rslora: bool = False

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accumulation


@dataclass(frozen=True)
class TrainSpec:
    """One training run. `output_dir` is where it writes; it is not part of the spec's identity."""

    base_model: str
    dataset_path: str
    output_dir: str
    heldout_path: str | None = None
    format: str = "alpaca"
    render: str = "chat"
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    seed: int = 3407
    backend: str = "auto"
    max_steps: int | None = None
    run_id: str | None = None
    # CPU threads for torch (None: torch's default). On a shared machine 1 thread can be 10x faster than 2
    # fighting another process for a core. It changes speed, not what is learnt, so it is not hashed.
    cpu_threads: int | None = None
    # Validation questions (the curator's validation families: never trained on, never the gate's held-out
    # ones): [{"example": a line of the dataset's format, "keys": what a right reply contains}]. Answered at
    # every KL measurement; the adapter kept is the step with the most right answers inside kl_budget
    # (academyd.trainer.loop.KLWatch). Carried in the spec itself (a handful), so that every habitat that
    # moves the spec moves them.
    validation: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, data: Any) -> TrainSpec:
        """Parse and validate; raise SpecError naming every bad field."""
        if not isinstance(data, dict):
            raise SpecError("the spec must be a JSON object")
        problems: list[str] = []
        known = {f.name for f in dataclasses.fields(cls)}
        for key in sorted(set(data) - known):
            problems.append(f"unknown field {key!r} (known: {', '.join(sorted(known))})")
        for key in ("base_model", "dataset_path", "output_dir"):
            if not isinstance(data.get(key), str) or not data.get(key, "").strip():
                problems.append(f"{key} is required and must be a non-empty string")
        if data.get("heldout_path") is not None and not isinstance(data["heldout_path"], str):
            problems.append("heldout_path must be a string path or null")
        # The trainer runs in its own working directory (a container, a run directory): a relative path
        # would name another file there, or none.
        for key in ("dataset_path", "heldout_path", "output_dir"):
            value = data.get(key)
            if isinstance(value, str) and value.strip() and not Path(value).is_absolute():
                problems.append(f"{key} must be an absolute path, got {value!r}")
        base = data.get("base_model")
        if isinstance(base, str) and base.startswith((".", "~")):
            problems.append(f"base_model must be an absolute path or a hub name, got the relative path {base!r}")
        if data.get("format", "alpaca") not in FORMATS:
            problems.append(f"format must be one of {FORMATS}, got {data.get('format')!r}")
        if data.get("render", "chat") not in RENDERS:
            problems.append(f"render must be one of {RENDERS}, got {data.get('render')!r}")
        if data.get("backend", "auto") not in BACKENDS:
            problems.append(f"backend must be one of {BACKENDS}, got {data.get('backend')!r}")
        seed = data.get("seed", 3407)
        if not isinstance(seed, int) or isinstance(seed, bool):
            problems.append("seed must be an integer")
        max_steps = data.get("max_steps")
        if max_steps is not None and (not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1):
            problems.append("max_steps must be a positive integer or null")
        threads = data.get("cpu_threads")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            problems.append("cpu_threads must be a positive integer or null")
        hp, hp_problems = _parse_hyperparameters(data.get("hyperparameters") or {})
        problems += hp_problems
        validation, v_problems = _parse_validation(data.get("validation"), data.get("format", "alpaca"))
        problems += v_problems
        if problems:
            raise SpecError("invalid training spec:\n" + "\n".join(f"  - {p}" for p in problems))
        return cls(
            base_model=data["base_model"],
            dataset_path=data["dataset_path"],
            output_dir=data["output_dir"],
            heldout_path=data.get("heldout_path"),
            format=data.get("format", "alpaca"),
            render=data.get("render", "chat"),
            hyperparameters=hp,
            seed=seed,
            backend=data.get("backend", "auto"),
            max_steps=max_steps,
            run_id=data.get("run_id"),
            cpu_threads=threads,
            validation=validation,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hyperparameters"]["target_modules"] = list(self.hyperparameters.target_modules)
        d["validation"] = [dict(v) for v in self.validation]
        return d

    def replace(self, **changes: Any) -> TrainSpec:
        return dataclasses.replace(self, **changes)


# At most this many validation questions: each is generated at every KL measurement, and the spec travels in
# a worker's job message.
MAX_VALIDATION = 16


def _parse_validation(raw: Any, fmt: Any) -> tuple[tuple[dict[str, Any], ...], list[str]]:
    if raw is None:
        return (), []
    if not isinstance(raw, (list, tuple)):
        return (), ["validation must be a list of {\"example\", \"keys\"} objects"]
    if len(raw) > MAX_VALIDATION:
        return (), [f"validation has {len(raw)} questions; at most {MAX_VALIDATION} (each is answered at every "
                    "KL measurement): lower curator.validation_families"]
    from academyd.trainer.data import _check  # standard library only, like this module

    problems = []
    for n, item in enumerate(raw):
        if not isinstance(item, dict) or set(item) - {"example", "keys", "family", "record"}:
            problems.append(f"validation[{n}] must be an object with \"example\" and \"keys\" "
                            "(and optionally \"family\", \"record\")")
            continue
        keys = item.get("keys")
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k.strip() for k in keys):
            problems.append(f"validation[{n}].keys must be a non-empty list of strings")
        why = _check(item.get("example"), fmt if fmt in FORMATS else "alpaca")
        if why:
            problems.append(f"validation[{n}].example: {why}")
    return (tuple(dict(item) for item in raw) if not problems else ()), problems


def _parse_hyperparameters(raw: Any) -> tuple[Hyperparameters, list[str]]:
    if not isinstance(raw, dict):
        return Hyperparameters(), ["hyperparameters must be a JSON object"]
    problems: list[str] = []
    fields = {f.name: f for f in dataclasses.fields(Hyperparameters)}
    values: dict[str, Any] = {}
    defaults = Hyperparameters()
    for key, value in raw.items():
        if key == "use_dora":
            continue  # refused below with the reason (unservable)
        if key not in fields:
            problems.append(f"unknown hyperparameter {key!r} (known: {', '.join(sorted(fields))})")
            continue
        default = getattr(defaults, key)
        if key == "target_modules":
            if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
                problems.append("hyperparameters.target_modules must be a non-empty list of module names")
                continue
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                problems.append(f"hyperparameters.{key} must be true or false")
                continue
        elif isinstance(default, int):
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"hyperparameters.{key} must be an integer")
                continue
        elif isinstance(default, float):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                problems.append(f"hyperparameters.{key} must be a finite number")
                continue
            value = float(value)
        elif isinstance(default, str) and not isinstance(value, str):
            problems.append(f"hyperparameters.{key} must be a string")
            continue
        values[key] = value
    hp = dataclasses.replace(defaults, **values)
    checks = [
        (hp.lora_r >= 1, "lora_r must be >= 1"),
        (hp.lora_alpha >= 1, "lora_alpha must be >= 1"),
        (0.0 <= hp.lora_dropout < 1.0, "lora_dropout must be in [0, 1)"),
        (0.0 < hp.learning_rate < 1.0, "learning_rate must be in (0, 1)"),
        (hp.epochs > 0, "epochs must be > 0"),
        (hp.batch_size >= 1, "batch_size must be >= 1"),
        (hp.grad_accumulation >= 1, "grad_accumulation must be >= 1"),
        (hp.max_length >= 16, "max_length must be >= 16"),
        (hp.warmup_steps >= 0, "warmup_steps must be >= 0"),
        (hp.weight_decay >= 0, "weight_decay must be >= 0"),
        (hp.max_grad_norm > 0, "max_grad_norm must be > 0"),
        (hp.logging_steps >= 1, "logging_steps must be >= 1"),
        (hp.save_steps >= 1, "save_steps must be >= 1"),
        (hp.save_total_limit >= 1, "save_total_limit must be >= 1"),
        (hp.eval_steps >= 0, "eval_steps must be >= 0"),
        (0.0 <= hp.replay_general <= 4.0, "replay_general must be in [0, 4]"),
        (hp.replay_loss in ("kl", "ce"), "replay_loss must be 'kl' or 'ce'"),
        (hp.adapter in ADAPTERS, f"adapter must be one of {ADAPTERS}"),
        (hp.kl_budget >= 0, "kl_budget must be >= 0 (0: no budget)"),
        (hp.kl_steps >= 0, "kl_steps must be >= 0"),
        (hp.kl_patience >= 1, "kl_patience must be >= 1 (measurements in a row past kl_budget that stop a run)"),
        (hp.kl_budget == 0 or hp.kl_steps >= 1, "kl_budget needs kl_steps >= 1 (how often the KL is measured)"),
        (hp.validation_max_new_tokens >= 1, "validation_max_new_tokens must be >= 1"),
    ]
    problems += [f"hyperparameters.{msg}" for ok, msg in checks if not ok]
    problems += [f"hyperparameters cannot be served: {why}" for why in unservable(raw)]
    return hp, problems


def plain_lora_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A saved adapter_config.json as a plain LoRA that every runtime scales right. Pure.

    rsLoRA scales by alpha/sqrt(r); a plain LoRA (llama.cpp, Ollama, PEFT without the flag) by alpha/r. So
    alpha becomes alpha*sqrt(r) (per module too, where rank_pattern gives a module its own rank) and the flag
    goes. MiCA's weights are a plain LoRA already: its init is recorded as a plain one, so a loader does not
    run MiCA's SVD init again only to overwrite it."""
    out = dict(cfg)
    if out.get("use_rslora"):
        r, alpha = out["r"], out["lora_alpha"]
        out["lora_alpha"] = alpha * math.sqrt(r)
        ranks = out.get("rank_pattern") or {}
        alphas = dict(out.get("alpha_pattern") or {})
        for module, module_r in ranks.items():
            alphas[module] = alphas.get(module, alpha) * math.sqrt(module_r)
        for module in set(alphas) - set(ranks):
            alphas[module] = alphas[module] * math.sqrt(r)
        if alphas:
            out["alpha_pattern"] = alphas
        out["use_rslora"] = False
    if isinstance(out.get("init_lora_weights"), str) and out["init_lora_weights"].lower() == "mica":
        out["init_lora_weights"] = True
    return out


def load_spec(path: str | Path) -> TrainSpec:
    """Read a spec file; raise SpecError when it is missing or not valid JSON."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read spec file {p}: {exc.strerror}; pass the path of a JSON spec") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"spec file {p} is not valid JSON: {exc}") from None
    return TrainSpec.from_dict(data)


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


_ADDED_LATER = {"adapter": "lora", "use_rslora": False, "kl_budget": 0.0, "kl_steps": 0,
                "validation_max_new_tokens": 32, "kl_patience": 3}


def spec_hash(spec: TrainSpec) -> str:
    """sha256 (hex) of what is trained and how; where and how fast (output_dir, run_id, cpu_threads) not."""
    d = spec.to_dict()
    for key in ("output_dir", "run_id", "cpu_threads"):
        d.pop(key)
    # Fields added later hash as before while they keep their default: a run started by an older daemon
    # still resumes from its checkpoints.
    for key, default in _ADDED_LATER.items():
        if d["hyperparameters"].get(key) == default:
            d["hyperparameters"].pop(key)
    if not d["validation"]:
        d.pop("validation")
    return hashlib.sha256(canonical_json(d).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Plan:
    """Hyperparameters as they will run, and one line per change explaining it."""

    hyperparameters: Hyperparameters
    notes: tuple[str, ...]


# Below this much memory (GPU memory on a GPU, RAM on the CPU) a batch of several sequences of max_length
# does not fit next to the model: run one at a time and accumulate gradients to the same effective batch.
SMALL_MEMORY_BYTES = 8 * GIB
TINY_MEMORY_BYTES = 4 * GIB
# LoRA over-fits large sets with many epochs; fewer passes give the same quality in less time.
EPOCH_CAPS = ((20_000, 1.0), (5_000, 2.0))


def plan_hyperparameters(
    hp: Hyperparameters, *, n_examples: int, memory_bytes: int | None, device: str
) -> Plan:
    """Fit `hp` to the dataset and the machine. Pure: same inputs, same plan.

    - memory under 8 GiB: batch 1, gradient accumulation raised to keep the effective batch;
      under 4 GiB also max_length capped at 1024;
    - an effective batch larger than the dataset is shrunk to it (one optimiser step per epoch at least);
    - large datasets get fewer epochs (>5k examples: at most 2, >20k: at most 1).
    `memory_bytes` None means unknown (no change for memory). With `hp.adjust` false nothing changes.
    """
    if n_examples < 1:
        raise ValueError("n_examples must be >= 1: an empty dataset cannot be trained on")
    if not hp.adjust:
        return Plan(hp, ("adjust=false: hyperparameters used as given",))
    notes: list[str] = []
    batch, accum, epochs, max_length = hp.batch_size, hp.grad_accumulation, hp.epochs, hp.max_length
    where = "GPU memory" if device.startswith("cuda") else "memory"
    if memory_bytes is not None and memory_bytes < SMALL_MEMORY_BYTES and batch > 1:
        accum, batch = accum * batch, 1
        notes.append(
            f"{where} {memory_bytes / GIB:.1f} GiB < {SMALL_MEMORY_BYTES // GIB} GiB: batch 1 with "
            f"gradient accumulation {accum} (same effective batch {accum})"
        )
    if memory_bytes is not None and memory_bytes < TINY_MEMORY_BYTES and max_length > 1024:
        max_length = 1024
        notes.append(f"{where} {memory_bytes / GIB:.1f} GiB < {TINY_MEMORY_BYTES // GIB} GiB: max_length 1024")
    if batch * accum > n_examples:
        batch = min(batch, n_examples)
        accum = max(1, n_examples // batch)
        notes.append(f"{n_examples} examples: effective batch cut to {batch * accum} (batch {batch} x {accum})")
    for threshold, cap in EPOCH_CAPS:
        if n_examples > threshold and epochs > cap:
            notes.append(f"{n_examples} examples > {threshold}: epochs {epochs:g} -> {cap:g}")
            epochs = cap
            break
    planned = dataclasses.replace(
        hp, batch_size=batch, grad_accumulation=accum, epochs=epochs, max_length=max_length
    )
    return Plan(planned, tuple(notes))


def total_steps(n_examples: int, hp: Hyperparameters, max_steps: int | None) -> int:
    """Optimiser steps the run will take (what transformers' Trainer computes for one process)."""
    if max_steps is not None:
        return max_steps
    batches = math.ceil(n_examples / hp.batch_size)
    steps_per_epoch = max(math.ceil(batches / hp.grad_accumulation), 1)
    return math.ceil(hp.epochs * steps_per_epoch)
