"""The arena's measurements, run in the trainer's environment (torch, transformers, peft, sacrebleu).

    python -m academyd.arena.measure --base MODEL --candidate DIR [--champion DIR] --heldout FILE
        --general FILE [--format alpaca|sharegpt] [--render chat|plain] [--generation-sample N]
        [--max-new-tokens N] [--seed N] [--cpu-threads N] [--device D]
        [--runtime llamacpp|none] [--out-dir DIR] [--general-sample N]

Loads the base model once, the candidate (and the champion) as named LoRA adapters on it, and prints one
JSON object on stdout:
    {"heldout": {"candidate": [{index, loss, tokens}], "champion": [...]},       champion = base if none
     "general": {"candidate": [...], "champion": [...], "base": [...]},
     "generation": {"n", "candidate_exact_match", "champion_exact_match", "candidate_chrf",
                    "champion_chrf", "examples": [{index, prompt, reference, candidate, champion}]},
     "skipped": {...}, "device": ...,
     "runtime": {...}}                                        (see academyd.arena.served)
With `--runtime llamacpp` (the default) and a base that has a GGUF (the default base does), the candidate
(and champion) adapters are exported to GGUF in `--out-dir` and the served artifact is measured too, in
llama.cpp: agreement with the trainer's greedy answers, held-out and general loss, exact match and chrF,
general answers; `--out-dir/probes.json` keeps the frozen probes (academyd.arena.runtime).
Exit codes as the trainer's: 0 ok, 2 bad input, 4 unexpected. The gate itself is `academyd.arena.gate`,
in the daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from academyd.trainer import spec as S
from academyd.trainer.data import DataError, prompt_ids, read_examples, rendered, sharegpt_messages


def normalize(text: str) -> str:
    return " ".join(text.split()).strip().lower()


def reference_of(ex: dict[str, Any], fmt: str) -> str:
    """The answer the prompt (`prompt_ids`: everything before the first reply) asks for."""
    if fmt == "alpaca":
        return str(ex["output"])
    return next(m["content"] for m in sharegpt_messages(ex) if m["role"] == "assistant")


def question_of(ex: dict[str, Any], fmt: str) -> str:
    """The request as a person would read it (for the judge)."""
    if fmt == "alpaca":
        return str(ex["instruction"]) + (f"\n\n{ex['input']}" if str(ex.get("input", "")).strip() else "")
    msgs = sharegpt_messages(ex)
    first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in msgs[:first])


def generate(model: Any, tokenizer: Any, ids: list[int], max_new_tokens: int) -> str:
    text, _ = generate_ids(model, tokenizer, ids, max_new_tokens)
    return text


def generate_ids(model: Any, tokenizer: Any, ids: list[int], max_new_tokens: int) -> tuple[str, list[int]]:
    """Greedy reply: (text without special tokens, the generated ids through the first EOS)."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids], device=device),
            attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    new = out[0, len(ids):].tolist()
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id) + 1]
    text = tokenizer.decode(new, skip_special_tokens=True)
    return str(text).strip(), new


def main(argv: list[str] | None = None) -> int:
    from academyd.trainer import _process

    out = _process.prepare()
    _process.die_with(os.environ.get(_process.PARENT_ENV))  # on a worker: ends with it (academyd.worker.evaluate)
    p = argparse.ArgumentParser(prog="python -m academyd.arena.measure", description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--candidate", required=True, type=Path)
    p.add_argument("--champion", type=Path)
    p.add_argument("--heldout", required=True, type=Path)
    p.add_argument("--general", required=True, type=Path)
    p.add_argument("--format", default="alpaca", choices=S.FORMATS)
    p.add_argument("--render", default="chat", choices=S.RENDERS)
    p.add_argument("--runtime", default="llamacpp", choices=("llamacpp", "none"))
    p.add_argument("--out-dir", type=Path, help="where the GGUF adapters and probes.json are written")
    p.add_argument("--serve", default="adapter", choices=("adapter", "merged"),
                   help="how the runtime serves a version: base + GGUF adapter, or the adapter merged into the "
                   "base as Q8_0 (what the ollama target serves from Ollama 0.34.1 on); the served artifact "
                   "is measured as it serves")
    p.add_argument("--general-sample", type=int, default=12, help="general questions answered in the runtime")
    p.add_argument("--generation-sample", type=int, default=16)
    p.add_argument("--checks", type=Path, help="the curator's checks file: checkable held-out questions to answer")
    p.add_argument("--answer-sample", type=int, default=64, help="checkable questions answered (at most)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-threads", type=int)
    p.add_argument("--device")
    a = p.parse_args(argv)
    try:
        heldout = read_examples(a.heldout, a.format, what="held-out set")
        general = read_examples(a.general, "alpaca", what="general set")
        for label, adapter in (("candidate", a.candidate), ("champion", a.champion)):
            if adapter is not None and not (adapter / "adapter_config.json").is_file():
                raise DataError(f"{label} adapter {adapter} has no adapter_config.json")
        if Path(a.base).is_dir() and not (Path(a.base) / "config.json").is_file():
            raise DataError(f"base model {a.base} has no config.json")
    except DataError as exc:
        out.write(json.dumps({"error": "bad_input", "reason": str(exc)}) + "\n")
        return S.EXIT_BAD_INPUT
    # The measurement shares the machine as the trainer does (academyd.trainer.cpu), before torch loads its
    # OpenMP runtime: threads from the CPUs left free unless --cpu-threads says, waits that sleep instead of
    # spinning, nice'd below the daemon and the serving runtime.
    from academyd.trainer import cpu

    plan = cpu.measure(a.cpu_threads)
    cpu.apply_env(plan)
    nice = cpu.lower_priority()
    a.cpu_threads = plan.threads
    a.cpu_plan = {**plan.to_dict(), "nice": nice}
    print(f"arena measure: {plan.reason}; torch threads {plan.threads}, wait policy {plan.wait_policy}, "
          f"nice {nice}", file=sys.stderr, flush=True)
    try:
        result = measure(a, heldout, general)
    except Exception as exc:  # noqa: BLE001 - the one place that turns any failure into the protocol
        traceback.print_exc()
        out.write(json.dumps({"error": "unexpected", "reason": f"{type(exc).__name__}: {exc}"}) + "\n")
        return S.EXIT_UNEXPECTED
    out.write(json.dumps(result) + "\n")
    return S.EXIT_OK


def measure(a: argparse.Namespace, heldout: list[dict[str, Any]], general: list[dict[str, Any]]) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from sacrebleu.metrics import CHRF
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from academyd.trainer.base import materialize
    from academyd.trainer.evaluate import encode_all, heldout_loss

    if a.cpu_threads:
        torch.set_num_threads(a.cpu_threads)
    torch.manual_seed(a.seed)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model_dir, identity = materialize(a.base)
    # Both adapters are trained on the same base; the candidate's saved tokenizer is the one it learnt with.
    tokenizer = AutoTokenizer.from_pretrained(str(a.candidate))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model = PeftModel.from_pretrained(base, str(a.candidate), adapter_name="candidate")
    if a.champion is not None:
        model.load_adapter(str(a.champion), adapter_name="champion")
    model.eval()

    @contextlib.contextmanager
    def using(side: str) -> Iterator[None]:
        if side == "base" or (side == "champion" and a.champion is None):
            with model.disable_adapter():
                yield
        else:
            model.set_adapter(side)
            yield

    pad_id = tokenizer.pad_token_id or 0
    # Asked as the trainer taught it: through the chat template by default (the general set too).
    heldout, fmt = rendered(heldout, a.format, a.render)
    general, gfmt = rendered(general, "alpaca", a.render)
    enc_held, skipped_held = encode_all(heldout, fmt, tokenizer, a.max_length)
    enc_gen, skipped_gen = encode_all(general, gfmt, tokenizer, a.max_length)
    result: dict[str, Any] = {"device": device, "cpu": getattr(a, "cpu_plan", None),
                              "format": a.format, "render": a.render, "base_identity": identity,
                              "champion_is_base": a.champion is None,
                              "skipped": {"heldout": skipped_held, "general": skipped_gen},
                              "heldout": {}, "general": {}}
    for side in ("candidate", "champion"):
        with using(side):
            result["heldout"][side] = heldout_loss(model, enc_held, pad_id, batch_size=a.batch_size)["examples"]
            result["general"][side] = heldout_loss(model, enc_gen, pad_id, batch_size=a.batch_size)["examples"]
    if a.champion is None:
        result["general"]["base"] = result["general"]["champion"]
    else:
        with using("base"):
            result["general"]["base"] = heldout_loss(model, enc_gen, pad_id, batch_size=a.batch_size)["examples"]

    rng = random.Random(a.seed)
    picks = sorted(rng.sample(range(len(heldout)), min(a.generation_sample, len(heldout))))
    examples = []
    trainer_ids: dict[int, list[int]] = {}
    for i in picks:
        ex = heldout[i]
        ids = prompt_ids(ex, fmt, tokenizer)[-a.max_length:]
        row: dict[str, Any] = {"index": i, "question": question_of(ex, fmt), "reference": reference_of(ex, fmt)}
        for side in ("candidate", "champion"):
            with using(side):
                row[side], new = generate_ids(model, tokenizer, ids, a.max_new_tokens)
            if side == "candidate":
                trainer_ids[i] = new
        examples.append(row)
    gen: dict[str, Any] = {"n": len(examples), "examples": examples}
    if examples:
        refs = [e["reference"] for e in examples]
        for side in ("candidate", "champion"):
            hyps = [e[side] for e in examples]
            gen[f"{side}_exact_match"] = sum(normalize(h) == normalize(r) for h, r in zip(hyps, refs, strict=True)) / len(refs)
            gen[f"{side}_chrf"] = CHRF().corpus_score(hyps, [refs]).score
    result["generation"] = gen
    checked = checked_indices(a.checks, len(heldout), a.answer_sample)
    if a.runtime == "llamacpp":
        from academyd.arena.served import measure_served

        sides = {"candidate": a.candidate, "champion": a.champion}
        result["runtime"] = measure_served(
            a, model=model, tokenizer=tokenizer, using=using, identity=identity, adapters=sides,
            heldout=heldout, fmt=fmt, enc_held=enc_held, general=general, gfmt=gfmt, enc_gen=enc_gen,
            picks=picks, trainer_answers={e["index"]: (e["candidate"], trainer_ids[e["index"]]) for e in examples},
            checked=checked)
    if checked and not (result.get("runtime") or {}).get("measured"):
        # No serving artifact to ask (a base without a GGUF): the trainer's own greedy answers, said so.
        answers: dict[str, Any] = {"engine": "transformers", "candidate": {}, "champion": {}}
        for i in checked:
            ids = prompt_ids(heldout[i], fmt, tokenizer)[-a.max_length:]
            for side in ("candidate", "champion"):
                with using(side):
                    answers[side][str(i)] = generate(model, tokenizer, ids, a.max_new_tokens)
        result["answers"] = answers
    elif checked:
        result["answers"] = result["runtime"].pop("answers")
    return result


def checked_indices(path: Path | None, n: int, sample: int) -> list[int]:
    """The held-out lines to ask: every checkable one, or `sample` of them spread over families (round-robin)."""
    if path is None or not path.is_file() or sample <= 0:
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_family: dict[str, list[int]] = {}
    for r in rows:
        if 0 <= int(r["index"]) < n:
            by_family.setdefault(str(r["family"]), []).append(int(r["index"]))
    order: list[int] = []
    queues = [sorted(v) for _, v in sorted(by_family.items())]
    while queues and len(order) < sample:
        queues = [q for q in queues if q]
        for q in queues:
            if len(order) < sample:
                order.append(q.pop(0))
    return sorted(order)


if __name__ == "__main__":
    sys.exit(main())
