"""`distill_loss` (academyd/trainer/loop.py): replay rows learn KL(base || adapter) over their response
tokens, the dataset's rows cross-entropy. Checked in the trainer environment against sums written out by hand,
on a lookup-table model (each token's logits fixed, so every position can be set apart) and on the tiny Llama
with a real peft LoRA, the adapter switched off for the teacher as in training."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fixtures.trainer import trainer_env

pytestmark = pytest.mark.slow

CHECK = r"""
import contextlib, json, math, sys
from types import SimpleNamespace
from academyd.trainer import _process
out = _process.prepare()
import torch
import torch.nn.functional as F
torch.set_num_threads(1)
from academyd.trainer.loop import distill_loss

PLAIN = SimpleNamespace(model_accepts_loss_kwargs=False)
res = {}

class Table(torch.nn.Module):
    # Logits of position t depend on token t only: student rows, or teacher rows with the adapter off.
    def __init__(self, student, teacher):
        super().__init__()
        self.student, self.teacher, self.off = torch.tensor(student), torch.tensor(teacher), False
    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=(self.teacher if self.off else self.student)[input_ids])
    @contextlib.contextmanager
    def disable_adapter(self):
        self.off = True
        try:
            yield
        finally:
            self.off = False

def loss(model, ids, labels, distill, trainer=PLAIN, n=None):
    inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), len(ids[0]), dtype=torch.long),
              "labels": torch.tensor(labels), "distill": torch.tensor(distill)}
    return float(distill_loss(trainer, model, inputs, n))

def softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]

def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))

S = [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-1.0, 3.0, 0.0]]   # student logits of tokens 0, 1, 2
T = [[1.0, 1.0, 0.0], [0.0, 2.0, -2.0], [0.0, 0.0, 0.0]]    # teacher (adapter off)
m = Table(S, T)
by_hand = [kl(softmax(T[i]), softmax(S[i])) for i in range(3)]
ids = [[0, 1, 2, 1]]   # positions 0..2 predict tokens 1, 2, 1
res["hand"] = {
    "all": [loss(m, ids, [[-100, 1, 2, 1]], [True]), (by_hand[0] + by_hand[1] + by_hand[2]) / 3],
    "masked": [loss(m, ids, [[-100, -100, 2, -100]], [True]), by_hand[1]],
    # A masked position's logits change (its token 1 -> 2, whose KL differs): the loss does not.
    "masked_changed": [loss(m, [[0, 2, 2, 1]], [[-100, 1, -100, 1]], [True]),
                       loss(m, [[0, 1, 2, 1]], [[-100, 1, -100, 1]], [True])],
    # A dataset row (cross-entropy on its labels) beside a replay row (KL), one mean over their tokens.
    "mixed": [loss(m, [[2, 0, 1, 0], [0, 1, 2, 1]], [[-100, 2, 0, -100], [-100, 1, 2, 1]], [False, True]),
              (-math.log(softmax(S[2])[2]) - math.log(softmax(S[0])[0]) + sum(by_hand)) / 5],
    # Trainer's token count across gradient-accumulation steps as the denominator, when it passes one.
    "num_items": [loss(m, ids, [[-100, 1, 2, 1]], [True], SimpleNamespace(model_accepts_loss_kwargs=True), 10),
                  sum(by_hand) / 10],
    "same_tables": loss(Table(S, S), ids, [[-100, 1, 2, 1]], [True]),
}

# The tiny Llama with a real LoRA: fresh (lora_B = 0, the adapter computes the base), then perturbed.
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
torch.manual_seed(0)
model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                        target_modules=["q_proj", "v_proj", "o_proj"]))
model.eval()
g = torch.Generator().manual_seed(1)
ids = torch.randint(5, 400, (2, 12), generator=g).tolist()
labels = [[-100] * 6 + r[6:] for r in ids]
labels[1][8] = -100
tiny = {"fresh": loss(model, ids, labels, [True, True])}
with torch.no_grad():
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0.0, 0.5, generator=g)
tiny["perturbed"] = loss(model, ids, labels, [True, True])
with model.disable_adapter():
    tiny["disabled"] = loss(model, ids, labels, [True, True])
with torch.no_grad():
    s = F.log_softmax(model(input_ids=torch.tensor(ids)).logits[:, :-1].float(), -1)
    with model.disable_adapter():
        t = F.log_softmax(model(input_ids=torch.tensor(ids)).logits[:, :-1].float(), -1)
    per = (t.exp() * (t - s)).sum(-1)
    mask = torch.tensor(labels)[:, 1:] != -100
    tiny["by_hand"] = float((per * mask).sum() / mask.sum())
    tiny["unmasked_mean"] = float(per.mean())
tiny["masked_more"] = loss(model, ids, [[-100] * 12, labels[1]], [True, True])
with torch.no_grad():
    tiny["masked_more_by_hand"] = float((per[1] * mask[1]).sum() / mask[1].sum())
res["tiny"] = tiny
out.write(json.dumps(res) + "\n")
"""


@pytest.fixture(scope="module")
def measured(trainer_python: Path, tiny_base_model: Path) -> dict[str, Any]:
    proc = subprocess.run([str(trainer_python), "-c", CHECK, str(tiny_base_model)], env=trainer_env(),
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_the_loss_is_the_kl_written_out_by_hand_over_unmasked_positions(measured: dict[str, Any]) -> None:
    hand = measured["hand"]
    for case in ("all", "masked", "mixed", "num_items"):
        got, want = hand[case]
        assert got == pytest.approx(want, rel=1e-5), (case, got, want)
    assert hand["masked"][0] != pytest.approx(hand["all"][0], rel=1e-3)  # the mask changed what was averaged
    changed, unchanged = hand["masked_changed"]
    assert changed == pytest.approx(unchanged, rel=1e-6)
    assert hand["same_tables"] == pytest.approx(0.0, abs=1e-7)


def test_on_the_tiny_model_zero_without_the_adapter_positive_with_it(measured: dict[str, Any]) -> None:
    tiny = measured["tiny"]
    # A fresh LoRA (lora_B = 0) and a disabled one compute the base: nothing to learn.
    assert tiny["fresh"] == pytest.approx(0.0, abs=1e-6), tiny
    assert tiny["disabled"] == pytest.approx(0.0, abs=1e-6), tiny
    assert tiny["perturbed"] > 1e-3, tiny
    assert tiny["perturbed"] == pytest.approx(tiny["by_hand"], rel=1e-4), tiny
    assert tiny["by_hand"] != pytest.approx(tiny["unmasked_mean"], rel=1e-3), tiny  # masked positions differ
    assert tiny["masked_more"] == pytest.approx(tiny["masked_more_by_hand"], rel=1e-4), tiny
