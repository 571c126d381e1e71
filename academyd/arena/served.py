"""The served artifact measured: the GGUF adapter on the GGUF base in llama.cpp (trainer environment).

`measure_served(...)` is called by `academyd.arena.measure` after the trainer-side measurement, with the
trainer's model still loaded. For each side (candidate, champion or base, base) it opens one llama.cpp
runtime (`academyd.arena.runtime`) and measures, on the tokens the trainer scored:

- agreement: on the frozen probes (the generation sample of the held-out set, plus `GENERAL_PROBES`),
  the trainer's greedy reply (transformers + peft, fp32 dequantized base) is fed to the runtime and the
  fraction of its tokens the runtime also ranks first is taken (teacher-forced top-1 agreement). A
  correct export scores near 1; another run's adapter, a scrambled tensor or another base score far
  lower (tests/arena/test_served.py measures both). The runtime's own greedy text is kept beside it.
- held-out and general loss per example (same rows as the trainer's, for the gate's rules);
- exact match and chrF of its own greedy answers on the generation sample (candidate and champion);
- general answers: greedy answers to a sample of the general set, chrF against the references, for the
  candidate and the base model (forgetting as a user sees it).
The probes, with both engines' answers (and token ids), go to `<out_dir>/probes.json` for the follower.

    python -m academyd.arena.served PROBES.json --base BASE.gguf [--adapter ADAPTER.gguf] [--threads N]

re-measures the agreement of any GGUF pair with the trainer's recorded answers and prints
{"agreement", "heldout_agreement", "general_agreement", "exact_text", "n"}; the base identity is checked
first (exit 2 on a mismatch, both named).
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

from academyd.arena import runtime as R
from academyd.trainer.data import chat_messages, prompt_ids


def _needed_ctx(encoded: list[dict[str, Any]], extra: int, cap: int) -> int:
    longest = max((len(e["input_ids"]) for e in encoded), default=0)
    return int(min(max(256, longest + extra + 16), max(cap, 256)))


def measure_served(a: Any, *, model: Any, tokenizer: Any, using: Any, identity: dict[str, Any],
                   adapters: dict[str, Path | None], heldout: list[dict[str, Any]], fmt: str,
                   enc_held: list[dict[str, Any]], general: list[dict[str, Any]], gfmt: str,
                   enc_gen: list[dict[str, Any]], picks: list[int],
                   trainer_answers: dict[int, tuple[str, list[int]]],
                   checked: list[int] | None = None) -> dict[str, Any]:
    from sacrebleu.metrics import CHRF

    from academyd.arena.export_gguf import ExportError, export_for_base
    from academyd.arena.measure import generate_ids, normalize, reference_of
    from academyd.basemodel import check_adapter_base, cached_sha256

    base_gguf = identity.get("gguf")
    if not base_gguf:
        return {"measured": False, "reason": f"the base model {identity.get('path')} has no GGUF file: nothing "
                "to serve in llama.cpp (give training.base_model as a .gguf to judge the served artifact)"}
    import llama_cpp

    t0 = time.monotonic()
    out_dir = Path(a.out_dir) if a.out_dir else Path(tempfile.mkdtemp(prefix="academy-served-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    ggufs: dict[str, str | None] = {"base": None}
    info: dict[str, Any] = {}
    for side, adapter in adapters.items():
        if adapter is None:
            continue
        path = out_dir / f"{side}.gguf"
        try:
            export_for_base(Path(adapter), path, a.base)
        except ExportError as exc:
            return {"measured": False, "refused": True, "reason": f"the {side} cannot be served: {exc}"}
        check_adapter_base(path, Path(base_gguf))  # what every consumer checks before loading it
        ggufs[side] = str(path)
        info[side] = {"path": str(path), "sha256": cached_sha256(path)}
    if adapters.get("champion") is None:
        ggufs["champion"] = None  # the champion is the base model
    served = served_models(a, base_gguf, ggufs, out_dir)
    t_export = time.monotonic() - t0

    # Probes: the trainer's greedy replies (candidate), to be fed to the runtime.
    probes: list[dict[str, Any]] = []
    for i in picks:
        text, ids = trainer_answers[i]
        probes.append({"kind": "heldout", "index": i, "messages": chat_messages(heldout[i], fmt),
                       "prompt_ids": prompt_ids(heldout[i], fmt, tokenizer), "trainer": text, "trainer_ids": ids})
    for q in R.GENERAL_PROBES:
        msgs = R.chat(q)
        ids = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        with using("candidate"):
            text, new = generate_ids(model, tokenizer, ids, a.max_new_tokens)
        probes.append({"kind": "general", "messages": msgs, "prompt_ids": ids, "trainer": text, "trainer_ids": new})

    rng = random.Random(a.seed + 1)
    gpicks = sorted(rng.sample(range(len(general)), min(a.general_sample, len(general))))
    n_ctx = _needed_ctx(enc_held + enc_gen, a.max_new_tokens + 64, a.max_length)
    threads = a.cpu_threads
    result: dict[str, Any] = {"measured": True, "engine": "llama.cpp", "llama_cpp_version": llama_cpp.__version__,
                              "base_gguf": base_gguf, "base_sha256": identity.get("sha256"), "adapters": info,
                              "n_ctx": n_ctx, "heldout": {}, "general": {},
                              "serve": getattr(a, "serve", "adapter"), "merged": served["merged"]}
    answers: dict[str, dict[int, str]] = {}
    general_answers: dict[str, dict[int, str]] = {}
    t_sides: dict[str, float] = {}
    order = ["candidate", "champion"] + (["base"] if adapters.get("champion") is not None else [])
    for side in order:
        ts = time.monotonic()
        model, gguf = served["models"].get(side) or (base_gguf, ggufs.get(side))
        with R.open_runtime(model, gguf, n_ctx=n_ctx, n_threads=threads, seed=a.seed) as rt:
            if side != "base":
                result["heldout"][side] = [_loss_row(rt, e) for e in enc_held]
                answers[side] = {i: rt.answer(chat_messages(heldout[i], fmt), max_tokens=a.max_new_tokens)
                                 for i in sorted(set(picks) | set(checked or []))}
            result["general"][side] = [_loss_row(rt, e) for e in enc_gen]
            if side == "candidate":
                for p in probes:
                    p["agreement"] = rt.top1_agreement(p["prompt_ids"], p["trainer_ids"])
                    p["runtime"] = rt.answer(p["messages"], max_tokens=a.max_new_tokens)
            if side == "candidate" or (side == "champion" and adapters.get("champion") is None) or side == "base":
                key = "candidate" if side == "candidate" else "base"
                general_answers[key] = {i: rt.answer(chat_messages(general[i], gfmt), max_tokens=a.max_new_tokens)
                                        for i in gpicks}
        t_sides[side] = time.monotonic() - ts
    if adapters.get("champion") is None:
        result["general"]["base"] = result["general"]["champion"]

    agreements = [p["agreement"] for p in probes]
    result["agreement"] = {
        "n": len(probes), "mean": R.mean(agreements), "min": min(agreements) if agreements else None,
        "exact_text": sum(normalize(p["trainer"]) == normalize(p["runtime"]) for p in probes),
        "heldout_mean": R.mean([p["agreement"] for p in probes if p["kind"] == "heldout"]),
        "general_mean": R.mean([p["agreement"] for p in probes if p["kind"] == "general"]),
    }
    refs = {i: reference_of(heldout[i], fmt) for i in picks}
    gen: dict[str, Any] = {"n": len(picks), "examples": [
        {"index": i, "reference": refs[i], **{s: answers[s][i] for s in ("candidate", "champion")}} for i in picks]}
    if picks:
        for side in ("candidate", "champion"):
            hyps = [answers[side][i] for i in picks]
            gen[f"{side}_exact_match"] = sum(normalize(answers[side][i]) == normalize(refs[i]) for i in picks) / len(picks)
            gen[f"{side}_chrf"] = CHRF().corpus_score(hyps, [[refs[i] for i in picks]]).score
    result["generation"] = gen
    grefs = {i: reference_of(general[i], gfmt) for i in gpicks}
    ga: dict[str, Any] = {"n": len(gpicks), "examples": [
        {"index": i, "question": chat_messages(general[i], gfmt)[-1]["content"], "reference": grefs[i],
         **{s: general_answers[s][i] for s in ("candidate", "base")}} for i in gpicks]}
    if gpicks:
        for side in ("candidate", "base"):
            hyps = [general_answers[side][i] for i in gpicks]
            ga[f"{side}_chrf"] = CHRF().corpus_score(hyps, [[grefs[i] for i in gpicks]]).score
            ga[f"{side}_exact_match"] = sum(normalize(general_answers[side][i]) == normalize(grefs[i])
                                            for i in gpicks) / len(gpicks)
    result["general_answers"] = ga
    if checked:
        # The checkable held-out questions, asked of the serving artifact as Venom asks (its system prompt and
        # the question as chat messages, greedy): what the gate scores right or wrong.
        result["answers"] = {"engine": "llama.cpp", **{s: {str(i): answers[s][i] for i in checked}
                                                        for s in ("candidate", "champion")}}
    result["timings"] = {"export_s": t_export, **{f"{k}_s": v for k, v in t_sides.items()},
                         "total_s": time.monotonic() - t0}
    R.write_probes(out_dir / R.PROBES_FILE, {
        "base_gguf": base_gguf, "base_sha256": identity.get("sha256"),
        "adapter_gguf_sha256": info.get("candidate", {}).get("sha256"), "max_tokens": a.max_new_tokens,
        "probes": [{k: p[k] for k in ("kind", "messages", "trainer", "runtime", "agreement", "prompt_ids",
                                      "trainer_ids")} for p in probes]})
    result["probes_path"] = str(out_dir / R.PROBES_FILE)
    return result


def served_models(a: Any, base_gguf: str, ggufs: dict[str, str | None], out_dir: Path) -> dict[str, Any]:
    """What each side's runtime loads: (model GGUF, adapter GGUF or None). With `--serve merged` (the
    `ollama` target from Ollama 0.34.1 on, which serves the LoRA merged into the base, not base + adapter)
    the candidate and an adapter champion are merged into the base as Q8_0 (academyd.arena.merge_gguf) and
    measured as such: the merged file is the serving artifact. The candidate's is kept as
    `<out_dir>/merged-q8_0.gguf`, where the follower finds it and serves this very file."""
    if getattr(a, "serve", "adapter") != "merged":
        return {"models": {}, "merged": {}}
    from academyd.arena.merge_gguf import merge, merged_file_name

    models: dict[str, tuple[str, str | None]] = {}
    merged: dict[str, Any] = {}
    for side, adapter in ggufs.items():
        if side == "base" or adapter is None:
            continue
        name = merged_file_name("q8_0") if side == "candidate" else f"{side}-{merged_file_name('q8_0')}"
        info = merge(Path(base_gguf), Path(adapter), out_dir / name, out_type="q8_0")
        models[side] = (info["path"], None)
        merged[side] = {k: info[k] for k in ("path", "sha256", "type", "merged", "merge_s", "total_s")}
    return {"models": models, "merged": merged}


def _loss_row(rt: R.Runtime, enc: dict[str, Any]) -> dict[str, Any]:
    total, n = rt.nll(enc["input_ids"], enc["labels"])
    return {"index": enc["index"], "loss": total / max(n, 1), "tokens": n}


def agreement_of(doc: dict[str, Any], base_gguf: str, adapter_gguf: str | None, *, n_threads: int | None = None,
                 with_text: bool = True) -> dict[str, Any]:
    """Teacher-forced agreement of (base_gguf + adapter_gguf) with the trainer answers recorded in `doc`."""
    from academyd.arena.measure import normalize

    probes = doc["probes"]
    need = max(len(p["prompt_ids"]) + len(p["trainer_ids"]) for p in probes) + 8
    rows = []
    with R.open_runtime(base_gguf, adapter_gguf, n_ctx=max(256, need), n_threads=n_threads) as rt:
        for p in probes:
            row = {"kind": p["kind"], "agreement": rt.top1_agreement(p["prompt_ids"], p["trainer_ids"])}
            if with_text:
                row["runtime"] = rt.answer(p["messages"], max_tokens=int(doc.get("max_tokens") or 64))
                row["same_text"] = normalize(row["runtime"]) == normalize(p["trainer"])
            rows.append(row)
    return {"n": len(rows), "agreement": R.mean([r["agreement"] for r in rows]),
            "heldout_agreement": R.mean([r["agreement"] for r in rows if r["kind"] == "heldout"]),
            "general_agreement": R.mean([r["agreement"] for r in rows if r["kind"] == "general"]),
            "exact_text": sum(bool(r.get("same_text")) for r in rows), "probes": rows}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys

    from academyd.basemodel import BaseModelError, check_adapter_base
    from academyd.trainer import _process

    out = _process.prepare()
    p = argparse.ArgumentParser(prog="python -m academyd.arena.served", description=__doc__.split("\n")[0])
    p.add_argument("probes", type=Path)
    p.add_argument("--base", required=True)
    p.add_argument("--adapter")
    p.add_argument("--threads", type=int)
    p.add_argument("--no-text", action="store_true", help="agreement only, no free-running answers")
    a = p.parse_args(argv)
    try:
        doc = R.read_probes(a.probes)
        if a.adapter:
            check_adapter_base(a.adapter, Path(a.base))
    except (OSError, ValueError) as exc:  # BaseModelError is a ValueError
        code = "base_mismatch" if isinstance(exc, BaseModelError) else "bad_input"
        out.write(json.dumps({"error": code, "reason": str(exc)}) + "\n")
        return 2
    out.write(json.dumps(agreement_of(doc, a.base, a.adapter, n_threads=a.threads, with_text=not a.no_text)) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
