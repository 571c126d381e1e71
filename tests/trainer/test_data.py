"""Prompt rendering and the loss mask, with the tiny model's real tokenizer (run in the trainer env)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fixtures.trainer import TrainerRun, trainer_env

from academyd.trainer import spec as S

pytestmark = pytest.mark.slow

CHECK = r"""
import json, sys
from academyd.trainer import _process
out = _process.prepare()
from transformers import AutoTokenizer
from academyd.trainer.data import encode, prompt_ids
tok = AutoTokenizer.from_pretrained(sys.argv[1])
alpaca = {"instruction": "Reverse the words.", "input": "red cat one", "output": "one cat red"}
no_input = {"instruction": "Say hi.", "input": "", "output": "hi"}
chat = {"conversations": [
    {"from": "system", "value": "Be brief."}, {"from": "human", "value": "red cat"},
    {"from": "gpt", "value": "cat red"}, {"from": "human", "value": "one two"}, {"from": "gpt", "value": "two one"}]}
res = {}
for name, ex, fmt in (("alpaca", alpaca, "alpaca"), ("no_input", no_input, "alpaca"), ("chat", chat, "sharegpt")):
    enc = encode(ex, fmt, tok, 2048)
    res[name] = {
        "text": tok.decode(enc["input_ids"]),
        "trained": tok.decode([i for i, l in zip(enc["input_ids"], enc["labels"]) if l != -100]),
        "prompt": tok.decode(prompt_ids(ex, fmt, tok)),
    }
res["too_long"] = encode(alpaca, "alpaca", tok, 8)
out.write(json.dumps(res) + "\n")
"""


def test_loss_mask_covers_responses_only(trainer_python: Path, tiny_base_model: Path) -> None:
    proc = subprocess.run([str(trainer_python), "-c", CHECK, str(tiny_base_model)], env=trainer_env(),
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert res["alpaca"]["text"] == (
        "<s>### Instruction:\nReverse the words.\n\n### Input:\nred cat one\n\n### Response:\none cat red</s>"
    )
    assert res["alpaca"]["trained"] == "one cat red</s>"
    assert res["alpaca"]["prompt"] == "<s>### Instruction:\nReverse the words.\n\n### Input:\nred cat one\n\n### Response:\n"
    assert "### Input" not in res["no_input"]["text"] and res["no_input"]["trained"] == "hi</s>"
    assert res["chat"]["text"].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nred cat")
    assert res["chat"]["trained"] == "cat red<|im_end|>\ntwo one<|im_end|>\n"
    assert res["too_long"] is None  # no response token fits in 8 tokens: the example is skipped


def test_sharegpt_run_learns(
    tmp_path: Path, make_spec: Callable[..., S.TrainSpec], run_trainer: Callable[..., TrainerRun]
) -> None:
    import random

    rng = random.Random(0)
    words = ["red", "blue", "green", "cat", "dog", "bird", "apple", "pear", "one", "two", "three", "fish"]
    paths = {}
    for name, n in (("train", 200), ("heldout", 40)):
        lines = []
        for _ in range(n):
            w = rng.sample(words, 3)
            lines.append(json.dumps({"conversations": [
                {"from": "system", "value": "You reverse words."},
                {"from": "human", "value": " ".join(w)},
                {"from": "gpt", "value": " ".join(reversed(w))},
            ]}))
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("\n".join(lines) + "\n")
    spec = make_spec(tmp_path / "run", format="sharegpt", dataset_path=str(paths["train"]),
                     heldout_path=str(paths["heldout"]), backend="peft", max_steps=40)
    run = run_trainer(spec)
    assert run.returncode == S.EXIT_OK, run.stderr[-3000:]
    summary = run.of_type("done")[0]["summary"]
    assert summary["final_loss"] < 0.5 * summary["first_loss"]
    assert summary["adapter_heldout_loss"] < 0.5 * summary["base_heldout_loss"]
    assert (tmp_path / "run" / S.ADAPTER_DIR / "chat_template.jinja").read_text().startswith("{% for message")


def test_evaluate_refuses_a_missing_adapter(trainer_python: Path, tiny_base_model: Path, alpaca_data: Any) -> None:
    proc = subprocess.run(
        [str(trainer_python), "-m", "academyd.trainer.evaluate", "--base", str(tiny_base_model),
         "--adapter", str(tiny_base_model / "no-adapter"), "--data", str(alpaca_data.heldout)],
        env=trainer_env(), capture_output=True, text=True, check=False, timeout=120,
    )
    assert proc.returncode == S.EXIT_BAD_INPUT
    out = json.loads(proc.stdout)
    assert out["error"] == "bad_input" and "adapter_config.json" in out["reason"]
