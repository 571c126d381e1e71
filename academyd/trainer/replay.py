"""Replay against forgetting: the base model's own answers to general prompts (self-distillation).

A LoRA trained only on house facts learns to answer everything with a fact (measured: 0 of 4 general
questions right after 3 epochs on 60 phrasings, base 3 of 4). Mixing in the base model's own greedy
answers to general prompts keeps its general behaviour the target for everything that is not a house
fact. No outside data is needed: the base writes its own targets.

`replay_examples(model_dir, tokenizer, n, ...)` returns up to `n` ShareGPT examples (one user turn, the
base's reply), generated once per (base identity, prompts, length) and cached beside the dequantized base.
The prompts (`data/replay_prompts.txt`) overlap neither the arena's general set nor the runtime's probes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from academyd.files import atomic_write_text

PROMPTS = Path(__file__).parent / "data" / "replay_prompts.txt"
MAX_NEW_TOKENS = 48


def prompts() -> list[str]:
    return [line.strip() for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]


def replay_examples(model_dir: str, tokenizer: Any, n: int, *, base_sha256: str, cache_dir: Path,
                    device: str = "cpu", max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict[str, Any]]:
    if n <= 0:
        return []
    qs = prompts()[:n]  # no more than are used (generation is most of replay's cost)
    key = hashlib.sha256(json.dumps([base_sha256, qs, max_new_tokens, tokenizer.chat_template]).encode()).hexdigest()
    path = cache_dir / f"replay-{key[:24]}.jsonl"
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        rows = _generate(model_dir, tokenizer, qs, device, max_new_tokens)
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    rows = [r for r in rows if r["conversations"][-1]["value"].strip()]
    return [rows[i % len(rows)] for i in range(n)] if rows else []


def _generate(model_dir: str, tokenizer: Any, qs: list[str], device: str, max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy answers of the plain base model, in batches (left padding), through its chat template."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    try:
        for start in range(0, len(qs), 8):
            chunk = qs[start : start + 8]
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                   add_generation_prompt=True) for q in chunk]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                     eos_token_id=tokenizer.eos_token_id)
            for q, seq in zip(chunk, out[:, batch["input_ids"].shape[1]:], strict=True):
                answer = tokenizer.decode(seq, skip_special_tokens=True).strip()
                if tokenizer.eos_token_id not in seq.tolist() and "." in answer:
                    # Cut off by the length limit: end at the last full sentence, or the adapter would
                    # learn to stop mid-sentence (the chat template closes every reply with end-of-turn).
                    answer = answer[: answer.rindex(".") + 1]
                rows.append({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": answer}]})
    finally:
        tokenizer.padding_side = side
        del model
    return rows
