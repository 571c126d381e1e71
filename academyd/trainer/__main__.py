"""`python -m academyd.trainer SPEC.json`: one LoRA training run, in the trainer environment only.

Run with the trainer environment's interpreter (`.venv-trainer/bin/python`, built by `make trainer-env`)
and PYTHONPATH set to the directory holding the `academyd` package. The spec is JSON
(`academyd.trainer.spec.TrainSpec`): base_model, dataset_path, heldout_path, format (alpaca|sharegpt),
hyperparameters, seed, output_dir, backend (auto|unsloth|peft), max_steps, validation (questions with answer
keys, asked at every KL measurement: the adapter kept is the best on them inside hyperparameters.kl_budget).

Stdout carries only the protocol: one JSON object per line, each with "type" and "time" (unix seconds);
library output goes to stderr. Every line is also appended to <output_dir>/events.jsonl.
    start       backend, backend_note, versions, device, memory_bytes, cpu (CPUs allowed, cgroup quota,
                busy, threads, wait policy, nice: academyd.trainer.cpu), spec_hash, total_steps,
                resumed_from (step or null), examples, heldout_examples, hyperparameters, plan_notes
    progress    step, total_steps, epoch, loss, learning_rate, grad_norm, tokens_per_s; eval_loss when computed;
                general_kl (and kl_budget) every hyperparameters.kl_steps steps, with the spec's validation
                questions validation_right/_total/_accuracy, and kept_step (the step whose weights are kept)
    checkpoint  step, path
    done        summary (the content of summary.json); already_done: true when the spec had finished before
    error       code (bad_input|loss_nan|loss_exploding|out_of_memory|cancelled|unexpected), reason, exit_code

Exit codes (constants in academyd.trainer.spec):
    0  ok: adapter/ and summary.json are written
    2  bad input: spec, dataset, held-out set or base model unusable; checked before torch loads; no adapter
    3  training failed: loss NaN or exploding, out of memory
    4  unexpected: a bug or broken environment; traceback on stderr
    5  cancelled by SIGTERM/SIGINT; the last checkpoint is kept

Output layout in output_dir:
    adapter/            adapter_model.safetensors, adapter_config.json (base_model_name_or_path = the
                        spec's base_model), tokenizer files and chat template; renamed into place whole
    summary.json        backend, versions, cpu, spec and spec_hash, steps, losses (final, base and adapter
                        held-out), general_kl (mean KL(adapter || base) per response token on the arena's
                        general set), kl_log, kl_stopped, validation (the step kept, its answers right and
                        KL), tokens/s, peak memory, durations, probe logits
    loss.jsonl          one line per logged step: step, epoch, loss, learning_rate, grad_norm
    heldout_eval.json   per-example held-out loss of the base model and of the adapter
    events.jsonl        the protocol lines
    checkpoints/        checkpoint-N/ every save_steps; removed after success. Starting the same spec
                        again (same spec_hash) resumes from the newest complete one.
"""

import sys

from academyd.trainer.train import run_main

if __name__ == "__main__":
    sys.exit(run_main(sys.argv[1:]))
