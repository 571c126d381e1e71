"""What the configured serving runtimes can load, checked before a training run starts (pure, daemon side).

A LoRA that trains fine but cannot be served is hours lost: `serving_problems(hp, runtimes, base)` lists,
for the runtimes this deployment serves with (llama.cpp when `arena.runtime = "llamacpp"`, Ollama when
`arena.ollama_url` is set), every target module and rank they cannot take, with the reason. The pipeline
refuses such a run before the trainer starts.

- Targets: llama.cpp applies LoRA to the matrix multiplications of a block (attention q/k/v/o and the MLP
  gate/up/down: `build_lora_mm` in llama.cpp); the token embedding is a row lookup it does not adapt, and
  a tied output head has no tensor of its own. `academyd.arena.export_gguf` writes exactly these seven.
  Ollama runs llama.cpp underneath, with the same limits.
- Rank: at most the smaller side of the smallest adapted matrix (the base's hidden size for the llama
  family): a larger rank is not a low-rank adapter and llama.cpp refuses the tensor shapes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

SERVABLE_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
WHY_NOT = {
    "embed_tokens": "the token embedding is a row lookup; llama.cpp applies LoRA to matrix products only",
    "lm_head": "llama.cpp serves no LoRA on the output head (SmolLM2 ties it to the embedding)",
}


def serving_runtimes(arena: Any) -> list[str]:
    out = []
    if getattr(arena, "runtime", "none") == "llamacpp":
        out.append("llama.cpp")
    if getattr(arena, "ollama_url", None):
        out.append("Ollama")
    return out


def serving_problems(hp: dict[str, Any], runtimes: Iterable[str], *, hidden_size: int | None) -> list[str]:
    """Reasons the configured runtimes cannot serve a LoRA with these hyperparameters ([] when they can)."""
    names = list(runtimes)
    if not names:
        return []
    who = " and ".join(names)
    problems = []
    targets = hp.get("target_modules") or sorted(SERVABLE_TARGETS)
    for target in targets:
        if target not in SERVABLE_TARGETS:
            why = WHY_NOT.get(target, "it is not one of the block's attention/MLP matrices the GGUF adapter "
                              f"format maps ({', '.join(sorted(SERVABLE_TARGETS))})")
            problems.append(f"target module {target!r} cannot be served by {who}: {why}")
    rank = hp.get("lora_r")
    if isinstance(rank, int) and hidden_size and rank > hidden_size:
        problems.append(f"lora_r {rank} exceeds the base model's hidden size {hidden_size}: {who} cannot load "
                        "a LoRA of that shape; use a rank <= the hidden size (16 is the default)")
    return problems
