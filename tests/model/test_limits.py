"""Runtime limits known before training: a LoRA the configured runtimes cannot serve is refused up front."""

from __future__ import annotations

import pytest

from academyd.arena.limits import serving_problems, serving_runtimes
from academyd.settings import ArenaSettings

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(("hp", "runtimes", "expect"), [
    ({"target_modules": SEVEN, "lora_r": 16}, ["llama.cpp"], []),
    ({}, ["llama.cpp", "Ollama"], []),
    ({"target_modules": [*SEVEN, "embed_tokens"]}, ["llama.cpp"], ["'embed_tokens' cannot be served by llama.cpp: the token embedding"]),
    ({"target_modules": ["q_proj", "lm_head"]}, ["Ollama"], ["'lm_head' cannot be served by Ollama"]),
    ({"target_modules": ["q_proj", "router"]}, ["llama.cpp"], ["'router' cannot be served"]),
    ({"lora_r": 1024}, ["llama.cpp"], ["lora_r 1024 exceeds the base model's hidden size 576"]),
    ({"lora_r": 1024, "target_modules": ["embed_tokens"]}, [], []),  # nothing serves here: nothing to check
])
def test_serving_problems(hp: dict, runtimes: list[str], expect: list[str]) -> None:
    problems = serving_problems(hp, runtimes, hidden_size=576)
    assert len(problems) == len(expect), problems
    for got, want in zip(problems, expect, strict=True):
        assert want in got


def test_the_runtimes_come_from_the_arena_settings() -> None:
    assert serving_runtimes(ArenaSettings()) == ["llama.cpp"]
    assert serving_runtimes(ArenaSettings(runtime="none", ollama_url="http://127.0.0.1:11434")) == ["Ollama"]
    assert serving_runtimes(ArenaSettings(runtime="none")) == []
