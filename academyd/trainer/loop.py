"""The training loop: transformers' Trainer with our collator (it counts tokens), the distillation loss on
replay rows, and the callback that turns its logs into the protocol's events, marks checkpoints and stops a
run whose loss is NaN or exploding.

torch and transformers are imported inside the functions: transformers may only load after Unsloth.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from academyd.files import atomic_write_json
from academyd.trainer import spec as S
from academyd.trainer.checkpoint import CHECKPOINT_MARKER
from academyd.trainer.errors import TrainingFailure
from academyd.trainer.events import EventWriter

# Loss above this multiple of the run's first logged loss means the run has blown up.
DIVERGENCE_FACTOR = 5.0
# The guard's reference is the largest of the first few logged losses, not the first one: batches mix rows
# of different kinds (a short lesson answer, a replay row learnt by KL) whose losses differ several-fold, so
# one low first batch would otherwise read as divergence.
DIVERGENCE_EARLY_LOGS = 5


class TokenCounter:
    """Wraps the collator to count real (non-pad) tokens fed to the model, for tokens/s."""

    def __init__(self, collate: Any, pad_id: int) -> None:
        self._collate = collate
        self._pad_id = pad_id
        self.tokens = 0

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        out = self._collate(batch, self._pad_id)
        self.tokens += int(out["attention_mask"].sum())
        if any("distill" in x for x in batch):
            import torch

            out["distill"] = torch.tensor([bool(x.get("distill")) for x in batch], dtype=torch.bool)
        return out


def distill_loss(trainer: Any, model: Any, inputs: dict[str, Any], num_items_in_batch: Any) -> Any:
    """Cross-entropy on the dataset's rows, KL(base || model) on the replay rows, over response tokens.

    Hard labels from the base's greedy replies sharpen the model (measured: the general set's loss on its
    references rose 23-27 % within 10 steps while the greedy answers stayed as good); the base's full
    distribution, computed with the adapter switched off, keeps what it does not know it does not know."""
    import torch
    import torch.nn.functional as F

    distill = inputs.pop("distill")
    labels = inputs["labels"]
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    shift = logits[:, :-1, :].float()
    target = labels[:, 1:]
    mask = target != -100
    per_token = F.cross_entropy(shift.transpose(1, 2), target.clamp(min=0), reduction="none")
    rows = distill.nonzero(as_tuple=True)[0]
    if rows.numel():
        with torch.no_grad(), model.disable_adapter():
            teacher = model(input_ids=inputs["input_ids"][rows], attention_mask=inputs["attention_mask"][rows]).logits
        t_logp = F.log_softmax(teacher[:, :-1, :].float(), dim=-1)
        s_logp = F.log_softmax(shift[rows], dim=-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
        per_token = per_token.index_put((rows,), kl)
    if num_items_in_batch is not None and getattr(trainer, "model_accepts_loss_kwargs", False):
        denom = num_items_in_batch
    else:
        denom = mask.sum().clamp(min=1)
    return (per_token * mask).sum() / denom


def make_trainer(spec, hp, model, tokenizer, enc_train, enc_heldout, pad_id, device, ckpt_dir, h, events,
                  steps, collate, enc_general=None):  # type: ignore[no-untyped-def]
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    counter = TokenCounter(collate, pad_id)
    use_eval = hp.eval_steps > 0 and bool(enc_heldout)
    half = {}
    if device == "cuda":
        half = {"bf16": True} if torch.cuda.is_bf16_supported() else {"fp16": True}
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=hp.batch_size,
        per_device_eval_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.grad_accumulation,
        num_train_epochs=hp.epochs,
        max_steps=spec.max_steps or -1,
        learning_rate=hp.learning_rate,
        lr_scheduler_type=hp.lr_scheduler,
        warmup_steps=hp.warmup_steps,
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        logging_steps=hp.logging_steps,
        save_strategy="steps",
        save_steps=hp.save_steps,
        save_total_limit=hp.save_total_limit,
        eval_strategy="steps" if use_eval else "no",
        eval_steps=hp.eval_steps if use_eval else None,
        seed=spec.seed,
        data_seed=spec.seed,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=device == "cpu",
        log_level="warning",
        **half,
    )
    # TrainerCallback is mixed in here, not at import time: transformers may only load after unsloth.
    callback_cls = type("ProtocolCallback", (ProtocolCallback, TrainerCallback), {})
    callback = callback_cls(events, Path(spec.output_dir) / S.LOSS_FILE, counter, h, steps)
    callbacks = [callback]
    if enc_general and hp.kl_steps > 0:
        watch_cls = type("KLWatch", (KLWatch, TrainerCallback), {})
        callbacks.append(watch_cls(events, model, enc_general, pad_id, hp.batch_size, hp.kl_budget, hp.kl_steps))
    trainer_cls = Trainer
    if hp.replay_loss == "kl":
        def compute_loss(self: Any, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            if "distill" not in inputs:
                return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            loss = distill_loss(self, model, inputs, num_items_in_batch)
            return (loss, None) if return_outputs else loss

        trainer_cls = type("DistillTrainer", (Trainer,), {"compute_loss": compute_loss})
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=enc_train,
        eval_dataset=enc_heldout if use_eval else None,
        data_collator=counter,
        callbacks=callbacks,
    )
    return trainer, counter


def exploding(early: list[float], loss: float) -> float | None:
    """The divergence guard, pure: the first DIVERGENCE_EARLY_LOGS losses are collected into `early`; a later
    loss over DIVERGENCE_FACTOR x their largest returns that largest (else None)."""
    if len(early) < DIVERGENCE_EARLY_LOGS:
        early.append(loss)
        return None
    reference = max(early)
    return reference if loss > DIVERGENCE_FACTOR * reference else None


class ProtocolCallback:
    """Turns Trainer logs into progress events and loss.jsonl lines, marks checkpoints, stops on NaN."""

    def __init__(self, events: EventWriter, loss_log: Path, counter: TokenCounter, spec_hash: str,
                 steps: int) -> None:
        self.events = events
        self.loss_log = loss_log
        self.counter = counter
        self.spec_hash = spec_hash
        self.steps = steps
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.early_losses: list[float] = []
        self._mark = (time.monotonic(), 0)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._mark = (time.monotonic(), self.counter.tokens)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        logs = logs or {}
        if "loss" not in logs and "eval_loss" not in logs:
            return
        now = time.monotonic()
        t0, tok0 = self._mark
        tps = (self.counter.tokens - tok0) / (now - t0) if now > t0 else None
        self._mark = (now, self.counter.tokens)
        loss = logs.get("loss")
        fields = {
            "step": state.global_step,
            "total_steps": state.max_steps,
            "epoch": state.epoch,
            "loss": loss,
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens_per_s": tps if loss is not None else None,
            "eval_loss": logs.get("eval_loss"),
        }
        self.events.emit(S.EVENT_PROGRESS, **{k: v for k, v in fields.items() if v is not None})
        if loss is None:
            return
        with self.loss_log.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({k: fields[k] for k in ("step", "epoch", "loss", "learning_rate", "grad_norm")},
                                allow_nan=True) + "\n")
        loss = float(loss)
        grad = logs.get("grad_norm")
        if not math.isfinite(loss) or (grad is not None and math.isnan(grad)):
            raise TrainingFailure("loss_nan", f"loss became {loss} at step {state.global_step}; lower "
                                  "hyperparameters.learning_rate, or check the dataset and the base model")
        if self.first_loss is None:
            self.first_loss = loss
        reference = exploding(self.early_losses, loss)
        if reference is not None:
            raise TrainingFailure("loss_exploding", f"loss {loss:.3g} at step {state.global_step} is over "
                                  f"{DIVERGENCE_FACTOR:g}x the early losses (at most {reference:.3g}); lower "
                                  "hyperparameters.learning_rate")
        self.last_loss = loss

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if path.is_dir():
            atomic_write_json(path / CHECKPOINT_MARKER, {"spec_hash": self.spec_hash, "step": state.global_step},
                              sort_keys=True, allow_nan=False)
            self.events.emit(S.EVENT_CHECKPOINT, step=state.global_step, path=str(path))


class KLWatch:
    """Forgetting as a budget: every `every` steps the mean KL(candidate || base) on the general set
    (evaluate.general_kl). Within the budget the adapter's trainable weights are kept (in memory: a LoRA is
    small); past it the kept ones are put back and training stops, so the adapter written is the last one
    measured inside the budget (the one training began with, if none was)."""

    def __init__(self, events: EventWriter, model: Any, encoded: list[dict[str, Any]], pad_id: int,
                 batch_size: int, budget: float, every: int) -> None:
        self.events, self.model, self.encoded, self.pad_id = events, model, encoded, pad_id
        self.batch_size, self.budget, self.every = batch_size, budget, every
        self.log: list[dict[str, float]] = []
        self.stopped: dict[str, Any] | None = None
        self._kept: tuple[int, dict[str, Any]] | None = None

    def _keep(self, step: int) -> None:
        self._kept = (step, {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad})

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.budget:
            self._keep(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step % self.every:
            return
        from academyd.trainer.evaluate import general_kl

        kl = general_kl(self.model, self.encoded, self.pad_id, batch_size=self.batch_size)
        self.log.append({"step": state.global_step, "general_kl": kl})
        self.events.emit(S.EVENT_PROGRESS, step=state.global_step, total_steps=state.max_steps, general_kl=kl,
                         **({"kl_budget": self.budget} if self.budget else {}))
        if not self.budget:
            return
        if kl <= self.budget:
            self._keep(state.global_step)
            return
        assert self._kept is not None  # kept at on_train_begin
        kept_step, weights = self._kept
        params = dict(self.model.named_parameters())
        import torch

        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        self.stopped = {"step": state.global_step, "general_kl": kl, "kl_budget": self.budget,
                        "kept_step": kept_step}
        control.should_training_stop = True
