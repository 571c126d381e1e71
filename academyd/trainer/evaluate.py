"""Held-out loss on response tokens, per example, for a base model with or without a LoRA adapter.

    python -m academyd.trainer.evaluate --base MODEL --data HELDOUT.jsonl [--adapter DIR]
        [--format alpaca|sharegpt] [--max-length N] [--batch-size N] [--probe] [--with-base]

Prints one JSON object on stdout:
    {"base", "adapter", "format", "loss" (token-weighted mean NLL), "perplexity", "tokens", "skipped",
     "examples": [{"index", "loss", "tokens"}], "probe": {...} (with --probe), "device",
     "base_result": {the same keys for the base model alone} (with --adapter and --with-base)}
Exit codes as the trainer's: 0 ok, 2 bad input (missing data/model/adapter), 4 unexpected.

The trainer uses the same functions for the base and adapter losses in summary.json, so the numbers here
and there are comparable (the arena builds on this). `probe` is the top logits after the first example's
prompt: a fingerprint to check that a reloaded adapter computes what the trained model computed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from pathlib import Path
from typing import Any

from academyd.trainer import spec as S
from academyd.trainer.data import IGNORE_INDEX, DataError, encode, prompt_ids, read_examples, rendered

PROBE_TOP_K = 32


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad input_ids (pad_id), labels (-100) and build the attention mask."""
    import torch

    width = max(len(x["input_ids"]) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        n = len(x["input_ids"])
        ids[i, :n] = torch.tensor(x["input_ids"])
        labels[i, :n] = torch.tensor(x["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def encode_all(examples: list[dict[str, Any]], fmt: str, tokenizer: Any, max_length: int) -> tuple[list[Any], int]:
    """Encoded examples (index kept) and how many were skipped (no response token within max_length)."""
    out, skipped = [], 0
    for i, ex in enumerate(examples):
        enc = encode(ex, fmt, tokenizer, max_length)
        if enc is None:
            skipped += 1
        else:
            out.append({**enc, "index": i})
    return out, skipped


def heldout_loss(model: Any, encoded: list[dict[str, Any]], pad_id: int, *, batch_size: int = 8) -> dict[str, Any]:
    """Mean negative log-likelihood of response tokens: token-weighted overall, and per example."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_example: list[dict[str, Any]] = []
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            batch = collate(chunk, pad_id)
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits.float()
            shift_logits = logits[:, :-1, :]
            shift_labels = batch["labels"][:, 1:].to(device)
            mask = shift_labels != IGNORE_INDEX
            nll = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)),
                shift_labels.clamp(min=0).reshape(-1),
                reduction="none",
            ).view(shift_labels.shape)
            nll = (nll * mask).sum(dim=1)
            counts = mask.sum(dim=1)
            for ex, s, c in zip(chunk, nll.tolist(), counts.tolist(), strict=True):
                per_example.append({"index": ex["index"], "loss": s / max(c, 1), "tokens": int(c)})
                total_nll += s
                total_tokens += int(c)
    if was_training:
        model.train()
    loss = total_nll / total_tokens if total_tokens else float("nan")
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 50 else float("inf"),
        "tokens": total_tokens,
        "examples": per_example,
    }


def general_kl(model: Any, encoded: list[dict[str, Any]], pad_id: int, *, batch_size: int = 8) -> float:
    """Mean KL(candidate || base) per response token, in nats: how far the adapter moved the model's
    next-token distribution from the base's (adapter switched off) on these examples. Forgetting tracks
    this distance (RL's Razor, arXiv 2509.04259), so it is what a forgetting budget is spent in."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start : start + batch_size], pad_id)
            ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            mask = batch["labels"][:, 1:].to(device) != IGNORE_INDEX
            c_logp = F.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1, :].float(), dim=-1)
            with model.disable_adapter():
                b_logp = F.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1, :].float(), dim=-1)
            kl = (c_logp.exp() * (c_logp - b_logp)).sum(-1)
            total += float((kl * mask).sum())
            tokens += int(mask.sum())
    if was_training:
        model.train()
    return total / tokens if tokens else float("nan")


def validation_replies(model: Any, tokenizer: Any, prompts: list[list[int]], pad_id: int, *,
                       max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy replies to prompts (token ids), batched with left padding; text up to the first eos."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    replies: list[str] = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=pad_id)
            for row in out[:, width:].tolist():
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                replies.append(str(tokenizer.decode(row, skip_special_tokens=True)).strip())
    if was_training:
        model.train()
    return replies


def validation_right(model: Any, tokenizer: Any, validation: list[dict[str, Any]], pad_id: int, *,
                     max_new_tokens: int) -> int:
    """How many validation questions ({"ids": prompt ids, "keys"}) the model answers right, greedily, scored
    as the gate scores (academyd.arena.answers.is_right: at least half the keys, by lemma)."""
    from academyd.arena.answers import is_right

    replies = validation_replies(model, tokenizer, [v["ids"] for v in validation], pad_id,
                                 max_new_tokens=max_new_tokens)
    for v, reply in zip(validation, replies, strict=True):
        v["last_reply"] = reply
    return sum(is_right(reply, v["keys"]) for v, reply in zip(validation, replies, strict=True))


def probe(model: Any, ids: list[int], *, top_k: int = PROBE_TOP_K) -> dict[str, Any]:
    """Top-k logits of the next token after `ids`."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float()
    if was_training:
        model.train()
    values, indices = torch.topk(logits, min(top_k, logits.numel()))
    return {"prompt_ids": ids, "top_ids": indices.tolist(), "top_logits": values.tolist()}


def load_model(base: str, adapter: str | None, device: str) -> tuple[Any, Any]:
    """Base model (plain transformers) with the adapter applied through peft, and the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from academyd.trainer.base import materialize

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    base, _ = materialize(base)  # a GGUF base: its dequantized directory
    tokenizer = AutoTokenizer.from_pretrained(adapter or base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, tokenizer


def _trained_render(adapter: str | None) -> str:
    if adapter:
        try:
            return str(json.loads((Path(adapter).parent / S.SUMMARY_FILE).read_text()).get("render") or "plain")
        except (OSError, ValueError):
            pass
    return "chat"


def main(argv: list[str] | None = None) -> int:
    from academyd.trainer import _process

    out = _process.prepare()
    p = argparse.ArgumentParser(prog="python -m academyd.trainer.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--adapter")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--format", default="alpaca", choices=S.FORMATS)
    p.add_argument("--render", default=None, choices=S.RENDERS,
                   help="chat template or plain (default: as the adapter was trained, from its run's summary.json; "
                   "else chat)")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--probe", action="store_true")
    p.add_argument("--with-base", action="store_true", help="also score the base model (adapter disabled)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    a = p.parse_args(argv)
    try:
        examples = read_examples(a.data, a.format, what="held-out set")
        if Path(a.base).is_dir() and not (Path(a.base) / "config.json").is_file():
            raise DataError(f"base model {a.base} has no config.json")
        if a.adapter and not (Path(a.adapter) / "adapter_config.json").is_file():
            raise DataError(f"adapter {a.adapter} has no adapter_config.json; pass a trained adapter directory")
    except DataError as exc:
        out.write(json.dumps({"error": "bad_input", "reason": str(exc)}) + "\n")
        return S.EXIT_BAD_INPUT
    try:
        import torch

        device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = load_model(a.base, a.adapter, device)
        render = a.render or _trained_render(a.adapter)
        examples, fmt = rendered(examples, a.format, render)
        encoded, skipped = encode_all(examples, fmt, tokenizer, a.max_length)
        result: dict[str, Any] = {"base": a.base, "adapter": a.adapter, "format": a.format, "device": device,
                                  "skipped": skipped}
        pad_id = tokenizer.pad_token_id or 0
        result.update(heldout_loss(model, encoded, pad_id, batch_size=a.batch_size))
        if a.probe:
            result["probe"] = probe(model, prompt_ids(examples[0], fmt, tokenizer))
        if a.adapter and a.with_base:
            with model.disable_adapter():
                base = heldout_loss(model, encoded, pad_id, batch_size=a.batch_size)
                if a.probe:
                    base["probe"] = probe(model, prompt_ids(examples[0], fmt, tokenizer))
            result["base_result"] = base
    except Exception as exc:  # noqa: BLE001 - the one place that turns any failure into the protocol
        traceback.print_exc()
        out.write(json.dumps({"error": "unexpected", "reason": f"{type(exc).__name__}: {exc}"}) + "\n")
        return S.EXIT_UNEXPECTED
    out.write(json.dumps(result) + "\n")
    return S.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
