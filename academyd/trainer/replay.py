"""Replay against forgetting: the base model's own answers to general prompts (self-distillation).

A LoRA trained only on house facts learns to answer everything with a fact (measured: 0 of 4 general
questions right after 3 epochs on 60 phrasings, base 3 of 4). Mixing in the base model's own greedy
answers to general prompts keeps its general behaviour the target for everything that is not a house
fact. No outside data is needed: the base writes its own targets.

`replay_examples(model_dir, tokenizer, n, ...)` returns up to `n` ShareGPT examples (the prompt's turns,
the base's reply), each generated once per (base identity, prompt, length, engine) and cached beside the
dequantized base. The prompts (`data/replay_prompts.txt`) come in both shapes the curator writes: a
question alone (one user turn) and `INSTRUCTION :: INPUT` (a system turn and a user turn, as an Alpaca
line with an input is asked), alternating so that any prefix has both. They overlap neither the arena's
general set nor the runtime's probes.

The answers are generated in llama.cpp on the base GGUF when there is one (what serves, and about 10x
faster on the CPU than transformers' generate: 396 s for 40 answers on 2 busy cores); otherwise (a model
directory) with transformers on the dequantized model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from academyd.files import atomic_write_text

PROMPTS = Path(__file__).parent / "data" / "replay_prompts.txt"
MAX_NEW_TOKENS = 48
SEPARATOR = " :: "

Messages = list[dict[str, str]]


def prompts() -> list[Messages]:
    """The replay prompts as chat messages (`INSTRUCTION :: INPUT` lines as a system and a user turn)."""
    out: list[Messages] = []
    for line in PROMPTS.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        system, sep, user = line.partition(SEPARATOR)
        out.append([{"role": "system", "content": system.strip()}, {"role": "user", "content": user.strip()}]
                   if sep else [{"role": "user", "content": line}])
    return out


def _llama_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure: fall back to transformers
        return False
    return True


def replay_examples(model_dir: str, tokenizer: Any, n: int, *, base_sha256: str, cache_dir: Path,
                    device: str = "cpu", max_new_tokens: int = MAX_NEW_TOKENS,
                    base_gguf: str | None = None) -> list[dict[str, Any]]:
    if n <= 0:
        return []
    qs = prompts()[:n]  # no more than are used (generation is most of replay's cost)
    engine = "llama.cpp" if base_gguf and _llama_available() else "transformers"
    # One cache file per (base, length, template, engine); a reply per prompt, so a run with more rows than
    # the last generates only the prompts it adds (each dataset size used to generate all of them again).
    # The eos ends a transformers reply (an earlier cache stopped at transformers' GGUF eos, see trainer.base).
    key = hashlib.sha256(json.dumps([base_sha256, max_new_tokens, tokenizer.chat_template, engine,
                                     tokenizer.eos_token_id, "per-prompt"]).encode()).hexdigest()
    path = cache_dir / f"replay-{key[:24]}.jsonl"
    cached: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                cached[entry["prompt"]] = entry["row"]
            except (ValueError, KeyError, TypeError):
                continue  # a torn or foreign line: that prompt is generated again
    ids = [_prompt_id(q) for q in qs]
    missing = {i: q for i, q in zip(ids, qs, strict=True) if i not in cached}
    if missing:
        todo = list(missing.values())
        if engine == "llama.cpp":
            assert base_gguf is not None
            replies = _generate_llamacpp(base_gguf, todo, max_new_tokens)
        else:
            replies = _generate_transformers(model_dir, tokenizer, todo, device, max_new_tokens)
        for (i, q), (text, finished) in zip(missing.items(), replies, strict=True):
            cached[i] = _row(q, text, finished)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, "".join(json.dumps({"prompt": i, "row": r}, ensure_ascii=False) + "\n"
                                            for i, r in cached.items()))
        except OSError:
            pass  # a read-only cache (the Docker habitat mounts the host's so): made again next time
    rows = [cached[i] for i in ids]
    rows = [r for r in rows if r["conversations"][-1]["value"].strip()]
    return [rows[i % len(rows)] for i in range(n)] if rows else []


def _prompt_id(messages: Messages) -> str:
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False).encode()).hexdigest()[:24]


def _row(messages: Messages, answer: str, finished: bool) -> dict[str, Any]:
    if not finished:
        # Cut off by the length limit: end at the last full sentence, or the adapter would learn to stop
        # mid-sentence (the chat template closes every reply with end-of-turn); nothing whole: no example.
        answer = answer[: answer.rindex(".") + 1] if "." in answer else ""
    role = {"system": "system", "user": "human"}
    conv = [{"from": role[m["role"]], "value": m["content"]} for m in messages]
    return {"conversations": [*conv, {"from": "gpt", "value": answer.strip()}]}


def _generate_llamacpp(base_gguf: str, qs: list[Messages], max_new_tokens: int) -> list[tuple[str, bool]]:
    """Greedy answers of the base GGUF in llama.cpp, through the chat template in the GGUF."""
    from academyd.arena.runtime import open_runtime

    with open_runtime(base_gguf, None, n_ctx=512) as rt:
        return [rt.complete(q, max_tokens=max_new_tokens) for q in qs]


def _generate_transformers(model_dir: str, tokenizer: Any, qs: list[Messages], device: str,
                           max_new_tokens: int) -> list[tuple[str, bool]]:
    """Greedy answers of the plain base model, in batches (left padding), through its chat template."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out_rows: list[tuple[str, bool]] = []
    try:
        for start in range(0, len(qs), 8):
            chunk = qs[start : start + 8]
            texts = [tokenizer.apply_chat_template(q, tokenize=False, add_generation_prompt=True) for q in chunk]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                     eos_token_id=tokenizer.eos_token_id)
            for seq in out[:, batch["input_ids"].shape[1]:]:
                answer = tokenizer.decode(seq, skip_special_tokens=True).strip()
                out_rows.append((answer, tokenizer.eos_token_id in seq.tolist()))
    finally:
        tokenizer.padding_side = side
        del model
    return out_rows
