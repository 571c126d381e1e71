"""The training loop: transformers' Trainer with our collator (it counts tokens), the distillation loss on
replay rows, and the callback that turns its logs into the protocol's events, marks checkpoints and stops a
run whose loss is NaN or exploding.

torch and transformers are imported inside the functions: transformers may only load after Unsloth.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
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
                  steps, collate, enc_general=None, validation=None):  # type: ignore[no-untyped-def]
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
    callbacks: list[Any] = [callback]
    if enc_general and hp.kl_steps > 0:
        watch_cls = type("KLWatch", (KLWatch, TrainerCallback), {})
        # Before the protocol callback: on a save the watch writes its state into the checkpoint first, and
        # the marker that makes the checkpoint usable comes last.
        callbacks.insert(0, watch_cls(events, model, enc_general, pad_id, hp.batch_size, hp.kl_budget,
                                      hp.kl_steps, tokenizer, validation, hp.validation_max_new_tokens,
                                      hp.kl_patience))
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


@dataclass(frozen=True)
class Measured:
    """One KL measurement while training: the step, the KL to the base, the validation answers right."""

    step: int
    general_kl: float
    right: int | None = None  # None: no validation questions
    total: int = 0

    @property
    def accuracy(self) -> float | None:
        return self.right / self.total if self.right is not None and self.total else None


def better(new: Measured, kept: Measured | None) -> bool:
    """Is `new` (a measurement inside the budget) the one to keep instead of `kept`? Pure.

    More validation answers right wins. On a tie the later step wins: a handful of questions ties often,
    and with the accuracy flat (0 of n early in a run) a lower-KL rule would keep the first measurement,
    cutting training short on a signal that says nothing; so without validation questions, or with the
    accuracy flat, this is the last measurement inside the budget, as before. (Measurements come in step
    order, so the later step is `new`.)"""
    if kept is None or kept.right is None or new.right is None:
        return True
    return new.right >= kept.right


def over_budget(streak: int, kl: float, budget: float) -> int:
    """How many measurements in a row are past the budget, after one more measuring `kl`. Pure."""
    return streak + 1 if budget and kl > budget else 0


WATCH_STATE = "academy_watch.json"  # in a checkpoint: the measurements so far and which step is kept
WATCH_KEPT = "academy_watch_kept.safetensors"  # in a checkpoint: the kept step's trainable weights


class KLWatch:
    """Forgetting as a budget, and early stopping on validation answers.

    Every `every` steps: the mean KL(candidate || base) on the general set (evaluate.general_kl) and, with
    validation questions, how many the model answers right (greedy, scored by academyd.arena.answers.is_right,
    as the gate scores). Of the measurements inside the budget (all of them without one) the trainable
    weights of the best (`better`) are kept in memory (a LoRA is small). `patience` measurements in a row
    past the budget stop training (one past is often the early peak that replay brings back down). At the
    end the kept weights are put back, so the adapter written is the best measured inside the budget (the
    one training began with, if none was). A last step that was not measured is measured at the end, so
    the adapter written has always been checked against the budget.

    What it has measured and the kept weights go into every checkpoint (`on_save`, before the checkpoint's
    marker) and come back on a resume (`resume_from`): a run killed after its best step and resumed still
    keeps that step, and its summary lists every measurement, not only those after the resume."""

    def __init__(self, events: EventWriter, model: Any, encoded: list[dict[str, Any]], pad_id: int,
                 batch_size: int, budget: float, every: int, tokenizer: Any = None,
                 validation: list[dict[str, Any]] | None = None, max_new_tokens: int = 32,
                 patience: int = S.Hyperparameters.kl_patience) -> None:
        self.events, self.model, self.encoded, self.pad_id = events, model, encoded, pad_id
        self.batch_size, self.budget, self.every, self.patience = batch_size, budget, every, patience
        self.over = 0  # measurements in a row past the budget
        self.tokenizer, self.validation, self.max_new_tokens = tokenizer, validation or [], max_new_tokens
        self.log: list[dict[str, Any]] = []
        self.stopped: dict[str, Any] | None = None
        self.best: Measured | None = None  # the measurement whose weights are kept
        self._kept: tuple[int, dict[str, Any]] | None = None
        self._last_measured: int | None = None
        self.kept_replies: list[str] = []

    @property
    def selecting(self) -> bool:
        """Whether weights are kept and put back: with a budget or validation questions."""
        return bool(self.budget) or bool(self.validation)

    def _keep(self, step: int) -> None:
        self._kept = (step, {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad})

    def _restore(self) -> None:
        assert self._kept is not None  # kept at on_train_begin
        params = dict(self.model.named_parameters())
        import torch

        with torch.no_grad():
            for name, value in self._kept[1].items():
                params[name].copy_(value)

    @property
    def kept_step(self) -> int | None:
        return self._kept[0] if self._kept is not None else None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.selecting and self._kept is None:  # not restored from a checkpoint by resume_from
            self._keep(state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not path.is_dir():
            return
        from safetensors.torch import save_file

        atomic_write_json(path / WATCH_STATE, {
            "log": self.log, "last_measured": self._last_measured,
            "best": None if self.best is None else asdict(self.best),
            "kept_step": self.kept_step, "kept_replies": self.kept_replies, "over": self.over,
        }, sort_keys=True, allow_nan=False)
        if self._kept is not None:
            tmp = path / (WATCH_KEPT + ".tmp")
            save_file({n: t.contiguous() for n, t in self._kept[1].items()}, str(tmp))
            tmp.replace(path / WATCH_KEPT)

    def resume_from(self, checkpoint: Path) -> bool:
        """Take back what the killed attempt had measured and kept, from the checkpoint training resumes
        from; False (and nothing changed) when the checkpoint holds no watch state (an older trainer's)."""
        try:
            saved = json.loads((checkpoint / WATCH_STATE).read_text())
        except (OSError, ValueError):
            return False
        kept: dict[str, Any] | None = None
        if saved.get("kept_step") is not None:
            from safetensors.torch import load_file

            try:
                kept = load_file(str(checkpoint / WATCH_KEPT))
            except (OSError, ValueError):
                return False
            trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
            if set(kept) != trainable:
                return False
        self.log = list(saved.get("log") or [])
        self._last_measured = saved.get("last_measured")
        self.best = None if saved.get("best") is None else Measured(**saved["best"])
        self.kept_replies = [str(r) for r in saved.get("kept_replies") or []]
        self.over = int(saved.get("over") or 0)
        if kept is not None:
            self._kept = (int(saved["kept_step"]), kept)
        return True

    def _measure(self, state: Any) -> Measured:
        from academyd.trainer.evaluate import general_kl, validation_right

        self._last_measured = state.global_step
        kl = general_kl(self.model, self.encoded, self.pad_id, batch_size=self.batch_size)
        inside = not self.budget or kl <= self.budget
        right = None
        if self.validation and inside:  # past the budget the step cannot be kept: no need to ask
            right = validation_right(self.model, self.tokenizer, self.validation, self.pad_id,
                                     max_new_tokens=self.max_new_tokens)
        m = Measured(state.global_step, kl, right, len(self.validation))
        entry: dict[str, Any] = {"step": m.step, "general_kl": kl}
        if right is not None:
            entry.update(validation_right=right, validation_total=m.total, validation_accuracy=m.accuracy)
        if inside and self.selecting and better(m, self.best):
            self.best = m
            self._keep(m.step)
            if right is not None:
                self.kept_replies = [str(v.get("last_reply")) for v in self.validation]
        self.log.append(entry)
        kept = {}
        if self.best is not None:
            kept = {"kept_step": self.best.step, "kept_general_kl": self.best.general_kl}
            if self.best.right is not None:
                kept["kept_validation_accuracy"] = self.best.accuracy
        self.events.emit(S.EVENT_PROGRESS, total_steps=state.max_steps, **entry,
                         **({"kl_budget": self.budget} if self.budget else {}), **kept)
        return m

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step % self.every:
            return
        m = self._measure(state)
        self.over = over_budget(self.over, m.general_kl, self.budget)
        if self.over >= self.patience:
            self.stopped = {"step": m.step, "general_kl": m.general_kl, "kl_budget": self.budget,
                            "kl_patience": self.patience, "kept_step": self.kept_step}
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not self.selecting:
            return
        if self.stopped is None and self._last_measured != state.global_step:
            self._measure(state)
        if self.kept_step != state.global_step or self.stopped is not None:
            self._restore()

    def validation_summary(self) -> dict[str, Any]:
        """What the summary says about the validation questions and the step kept."""
        if not self.validation:
            return {"questions": 0}
        out: dict[str, Any] = {"questions": len(self.validation), "max_new_tokens": self.max_new_tokens,
                               "rule": "most validation answers right among the KL measurements inside "
                                       "kl_budget; a tie goes to the later step"}
        if self.best is not None and self.best.right is not None:
            out.update(kept_step=self.best.step, right=self.best.right, accuracy=self.best.accuracy,
                       general_kl=self.best.general_kl,
                       replies=[{"family": v.get("family"), "keys": v["keys"], "reply": reply}
                                for v, reply in zip(self.validation, self.kept_replies, strict=True)][:16])
        else:
            out.update(kept_step=self.kept_step, right=None, accuracy=None,
                       note="no measurement inside the budget: the adapter is the one training began with")
        return out
