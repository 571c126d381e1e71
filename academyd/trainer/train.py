"""One LoRA training run: check inputs, plan, load a backend, train with checkpoints, write the adapter.

Runs only in the trainer environment (torch, Unsloth). `run_main(argv)` is the entry point behind
`python -m academyd.trainer SPEC.json`; the protocol is documented in `academyd.trainer.__main__`.
This module orders the steps; each lives in its own module:

    inputs      the spec's datasets and base model, checked before torch is imported
    backend     versions, the device, the LoRA model on Unsloth or transformers+peft
    loop        the Trainer, its collator, the distillation loss and the protocol callback
    checkpoint  checkpoints, the loss log, the adapter written whole, a finished run found again
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import signal
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from academyd.files import atomic_write_json, sha256_file
from academyd.trainer import cpu
from academyd.trainer import spec as S
from academyd.trainer.backend import detect_device, load_backend, versions
from academyd.trainer.checkpoint import find_checkpoint, previous_result, save_adapter, trim_loss_log
from academyd.trainer.data import DataError, prompt_ids
from academyd.trainer.errors import BadInput, Cancelled, TrainingFailure
from academyd.trainer.events import EventWriter
from academyd.trainer.inputs import check_inputs
from academyd.trainer.loop import ProtocolCallback, make_trainer


def run(spec: S.TrainSpec, train: list[dict[str, Any]], heldout: list[dict[str, Any]], events: EventWriter,
        cpu_plan: cpu.CpuPlan | None = None) -> dict[str, Any]:
    t_start = time.monotonic()
    out_dir = Path(spec.output_dir)
    h = S.spec_hash(spec)
    ckpt_dir = out_dir / S.CHECKPOINTS_DIR
    resume_path, resume_step = find_checkpoint(ckpt_dir, h)
    for stale in out_dir.glob(".adapter.*"):  # an earlier attempt stopped while saving
        shutil.rmtree(stale, ignore_errors=True)
    if cpu_plan is None:  # called directly (run_main measures before torch is imported)
        cpu_plan = cpu.measure(spec.cpu_threads)
        cpu.apply_env(cpu_plan)
    import torch

    torch.set_num_threads(cpu_plan.threads)
    cpu_log = {**cpu_plan.to_dict(), "torch_threads": torch.get_num_threads(),
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "nice": os.getpriority(os.PRIO_PROCESS, 0)}
    print(f"trainer cpu: {cpu_plan.reason}; torch threads {cpu_log['torch_threads']}, wait policy "
          f"{cpu_log['omp_wait_policy']}, nice {cpu_log['nice']}", file=sys.stderr, flush=True)

    device, device_desc, memory = detect_device()
    plan = S.plan_hyperparameters(spec.hyperparameters, n_examples=len(train), memory_bytes=memory, device=device)
    hp = plan.hyperparameters
    from academyd.basemodel import BaseModelError
    from academyd.trainer.base import materialize

    try:
        model_path, base_identity = materialize(spec.base_model)
    except BaseModelError as exc:
        raise BadInput(str(exc)) from None
    model, tokenizer, backend, backend_note = load_backend(spec, hp, device, model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # pad may be the turn-end token (SmolLM2's GGUF declares <|im_end|> for both): padding is masked by
    # position (evaluate.collate), never by id, so the turn end stays a trained label.
    pad_id = tokenizer.pad_token_id

    from academyd.trainer.data import rendered
    from academyd.trainer.evaluate import collate, encode_all, heldout_loss, probe

    # By default every example goes through the base model's chat template: the adapter learns what serves.
    train, fmt = rendered(train, spec.format, spec.render)
    heldout, _ = rendered(heldout, spec.format, spec.render)
    n_dataset = len(train)
    replay: list[dict[str, Any]] = []
    t_replay = time.monotonic()
    if hp.replay_general > 0 and fmt == "sharegpt":
        from academyd.basemodel import base_cache
        from academyd.trainer.replay import replay_examples

        replay = replay_examples(model_path, tokenizer, math.ceil(hp.replay_general * n_dataset),
                                 base_sha256=base_identity["sha256"], cache_dir=base_cache(), device=device,
                                 base_gguf=base_identity.get("gguf"))
        train = train + replay
    replay_s = time.monotonic() - t_replay
    try:
        enc_train, skipped = encode_all(train, fmt, tokenizer, hp.max_length)
        if hp.replay_loss == "kl":
            # Replay rows learn the base's whole next-token distribution (see loop.distill_loss), not its greedy text.
            enc_train = [{**e, "distill": int(e["index"] >= n_dataset)} for e in enc_train]
        enc_heldout, heldout_skipped = encode_all(heldout, fmt, tokenizer, hp.max_length)
        enc_general = _general_set(spec, tokenizer, hp.max_length)
        validation = _validation_set(spec, tokenizer)
    except DataError as exc:
        raise BadInput(str(exc)) from None
    if not enc_train:
        raise BadInput(f"no example of {spec.dataset_path} has a response token within max_length "
                       f"{hp.max_length}; raise hyperparameters.max_length or shorten the prompts")
    steps = S.total_steps(len(enc_train), hp, spec.max_steps)

    events.emit(
        S.EVENT_START,
        run_id=spec.run_id,
        backend=backend,
        backend_note=backend_note,
        versions=versions(),
        device=device_desc,
        memory_bytes=memory,
        cpu=cpu_log,
        spec_hash=h,
        total_steps=steps,
        resumed_from=resume_step if resume_path else None,
        examples=len(enc_train),
        replay_examples=len(replay),
        skipped_examples=skipped,
        heldout_examples=len(enc_heldout),
        hyperparameters=asdict(hp),
        plan_notes=list(plan.notes),
    )

    # LoRA's B matrices start at zero, so the fresh adapter computes the base model: this is the base loss.
    # After a resume the checkpoint's weights are loaded later, inside train(), so it still is.
    base_eval = heldout_loss(model, enc_heldout, pad_id, batch_size=hp.batch_size) if enc_heldout else None

    trainer, counter = make_trainer(spec, hp, model, tokenizer, enc_train, enc_heldout, pad_id, device,
                                     ckpt_dir, h, events, steps, collate, enc_general, validation)
    loss_log = out_dir / S.LOSS_FILE
    if resume_path:
        trim_loss_log(loss_log, resume_step)
    elif loss_log.exists():
        loss_log.unlink()
    from academyd.trainer.loop import KLWatch

    watch = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, KLWatch)), None)
    if resume_path and watch is not None and not watch.resume_from(resume_path):
        print(f"trainer: {resume_path.name} holds no KL-watch state; measurements before step {resume_step} "
              "are not known to this attempt", file=sys.stderr, flush=True)
    t_train = time.monotonic()
    result = trainer.train(resume_from_checkpoint=str(resume_path) if resume_path else None)
    train_s = time.monotonic() - t_train

    adapter_eval = heldout_loss(model, enc_heldout, pad_id, batch_size=hp.batch_size) if enc_heldout else None
    from academyd.trainer.evaluate import general_kl

    kl = general_kl(model, enc_general, pad_id, batch_size=hp.batch_size) if enc_general else None
    probe_ex = heldout[enc_heldout[0]["index"]] if enc_heldout else train[enc_train[0]["index"]]
    fingerprint = probe(model, prompt_ids(probe_ex, fmt, tokenizer))
    adapter = save_adapter(model, tokenizer, out_dir, spec.base_model, base_identity)

    import torch

    guard = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ProtocolCallback))
    summary = {
        "run_id": spec.run_id,
        # Not the validation questions' text (in the spec the run was given): the done event crosses NATS.
        "spec": {**spec.to_dict(), "validation": [{"family": v.get("family"), "keys": v["keys"]}
                                                  for v in spec.validation]},
        "spec_hash": h,
        "backend": backend,
        "backend_note": backend_note,
        "versions": versions(),
        "device": device_desc,
        "cpu": cpu_log,
        "hyperparameters": asdict(hp),
        "plan_notes": list(plan.notes),
        "examples": len(enc_train),
        "replay_examples": len(replay),
        "replay_s": replay_s,
        "render": spec.render,
        "skipped_examples": skipped,
        "heldout_examples": len(enc_heldout),
        "heldout_skipped": heldout_skipped,
        "dataset_sha256": sha256_file(spec.dataset_path),
        "heldout_sha256": sha256_file(spec.heldout_path) if spec.heldout_path else None,
        "steps": trainer.state.global_step,
        "total_steps": trainer.state.max_steps,
        "epochs": trainer.state.epoch,
        "resumed_from": resume_step if resume_path else None,
        "first_loss": guard.first_loss,
        "final_loss": guard.last_loss,
        "train_loss": result.training_loss,
        "base_heldout_loss": base_eval["loss"] if base_eval else None,
        "adapter_heldout_loss": adapter_eval["loss"] if adapter_eval else None,
        "base_heldout_perplexity": base_eval["perplexity"] if base_eval else None,
        "adapter_heldout_perplexity": adapter_eval["perplexity"] if adapter_eval else None,
        "heldout_tokens": adapter_eval["tokens"] if adapter_eval else 0,
        # Mean KL(adapter || base) per response token on the arena's general set, nats (None: no set).
        "general_kl": kl,
        "kl_budget": hp.kl_budget or None,
        "kl_log": watch.log if watch else [],
        "kl_stopped": watch.stopped if watch else None,
        # The adapter kept: the step with the most validation answers right inside the KL budget.
        "validation": _validation_note(watch, validation),
        "train_tokens": counter.tokens,
        "tokens_per_s": counter.tokens / train_s if train_s > 0 else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "train_duration_s": train_s,
        "duration_s": time.monotonic() - t_start,
        "adapter_path": str(adapter),
        "base": base_identity,
        "probe": fingerprint,
    }
    if base_eval and adapter_eval:
        atomic_write_json(out_dir / "heldout_eval.json",
                          {"base": base_eval["examples"], "adapter": adapter_eval["examples"]},
                          sort_keys=True, allow_nan=False)
    atomic_write_json(out_dir / S.SUMMARY_FILE, summary, sort_keys=True, allow_nan=False)
    # The adapter and summary are durable: the optimizer states in the checkpoints are no longer needed.
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return summary


def _general_set(spec: S.TrainSpec, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """The arena's general set (academyd/arena/data/general.jsonl), encoded as the dataset is rendered: what
    the KL to the base is measured on. [] when the package has none."""
    from academyd.trainer.data import read_examples, rendered
    from academyd.trainer.evaluate import encode_all

    path = Path(__file__).resolve().parent.parent / "arena" / "data" / "general.jsonl"
    if not path.is_file():
        return []
    general, fmt = rendered(read_examples(path, "alpaca", what="general set"), "alpaca", spec.render)
    return encode_all(general, fmt, tokenizer, max_length)[0]


def _validation_set(spec: S.TrainSpec, tokenizer: Any) -> list[dict[str, Any]]:
    """The spec's validation questions as prompt ids (rendered as the dataset is) and keys."""
    from academyd.trainer.data import rendered

    if not spec.validation:
        return []
    examples, fmt = rendered([dict(v["example"]) for v in spec.validation], spec.format, spec.render)
    return [{"ids": prompt_ids(ex, fmt, tokenizer), "keys": list(v["keys"]), "family": v.get("family")}
            for ex, v in zip(examples, spec.validation, strict=True)]


def _validation_note(watch: Any, validation: list[dict[str, Any]]) -> dict[str, Any]:
    if not validation:
        return {"questions": 0, "note": "the spec has no validation questions (the curator sets validation "
                "families aside with curator.validation_families > 0, when the dataset has enough lesson "
                "families with checkable answers: its manifest's `validation` says): the adapter kept is the "
                "last one measured inside kl_budget, as without validation"}
    if watch is None:
        return {"questions": len(validation), "note": "not asked: hyperparameters.kl_steps is 0, so nothing is "
                "measured while training; the adapter is the last step's"}
    return watch.validation_summary()


def _on_signal(signum: int, frame: Any) -> None:
    raise Cancelled(signal.Signals(signum).name)


def run_main(argv: list[str]) -> int:
    from academyd.trainer import _process

    events = EventWriter(_process.prepare())
    _process.die_with(os.environ.get(_process.PARENT_ENV))
    if len(argv) != 1:
        events.emit(S.EVENT_ERROR, code="bad_input", reason="usage: python -m academyd.trainer SPEC.json",
                    exit_code=S.EXIT_BAD_INPUT)
        return S.EXIT_BAD_INPUT
    try:
        spec = S.load_spec(argv[0])
        out_dir = Path(spec.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    except (S.SpecError, OSError) as exc:
        events.emit(S.EVENT_ERROR, code="bad_input", reason=str(exc), exit_code=S.EXIT_BAD_INPUT)
        return S.EXIT_BAD_INPUT
    events.attach(out_dir / S.EVENTS_FILE)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        train, heldout = check_inputs(spec)
        previous = previous_result(spec)
        if previous is not None:
            events.emit(S.EVENT_DONE, summary=previous, already_done=True)
            return S.EXIT_OK
        # Before torch is imported: its OpenMP runtime reads the thread count and wait policy once, at load.
        cpu_plan = cpu.measure(spec.cpu_threads)
        cpu.apply_env(cpu_plan)
        cpu.lower_priority()
        summary = run(spec, train, heldout, events, cpu_plan)
    except BadInput as exc:
        events.emit(S.EVENT_ERROR, code="bad_input", reason=str(exc), exit_code=S.EXIT_BAD_INPUT)
        return S.EXIT_BAD_INPUT
    except TrainingFailure as exc:
        events.emit(S.EVENT_ERROR, code=exc.code, reason=str(exc), exit_code=S.EXIT_TRAINING_FAILED)
        return S.EXIT_TRAINING_FAILED
    except Cancelled as exc:
        events.emit(S.EVENT_ERROR, code="cancelled", reason=f"stopped by {exc}; the last checkpoint is kept "
                    "and the same spec resumes from it", exit_code=S.EXIT_CANCELLED)
        return S.EXIT_CANCELLED
    except Exception as exc:  # noqa: BLE001 - the one place that turns any failure into the protocol
        traceback.print_exc(file=sys.stderr)
        code, exit_code = "unexpected", S.EXIT_UNEXPECTED
        if "out of memory" in str(exc).lower() or isinstance(exc, MemoryError):
            code, exit_code = "out_of_memory", S.EXIT_TRAINING_FAILED
        events.emit(S.EVENT_ERROR, code=code, reason=f"{type(exc).__name__}: {exc}", exit_code=exit_code)
        return exit_code
    events.emit(S.EVENT_DONE, summary=summary)
    return S.EXIT_OK
