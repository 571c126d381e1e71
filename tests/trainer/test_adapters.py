"""Adapter variants that survive export: LoRA and MiCA selectable; what no GGUF LoRA can carry is refused
when the settings load, with the reason; rsLoRA is saved as the plain LoRA that serves at its scale."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import pytest
from pydantic import ValidationError

from academyd.settings import TrainingSettings
from academyd.trainer.spec import Hyperparameters, SpecError, TrainSpec, plain_lora_config, spec_hash

BASE = {"base_model": "/models/smol", "dataset_path": "/data/train.jsonl", "output_dir": "/runs/r1"}


@pytest.mark.parametrize(("hp", "reason"), [
    ({"use_dora": True}, "DoRA adds a magnitude vector the GGUF LoRA format has no place for"),
    ({"target_modules": ["q_proj", "lm_head"]}, "'lm_head': on a base with tied embeddings"),
    ({"adapter": "dora"}, "adapter must be one of lora, mica"),
])
def test_unservable_adapters_are_refused_when_the_settings_load(hp: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        TrainingSettings(hyperparameters=hp)
    assert "could not be served" in str(info.value) and reason in str(info.value)


@pytest.mark.parametrize("hp", [{}, {"adapter": "mica"}, {"adapter": "lora", "use_rslora": True},
                                {"use_dora": False}, {"target_modules": ["q_proj", "v_proj"]}])
def test_servable_adapters_load(hp: dict[str, Any]) -> None:
    assert TrainingSettings(hyperparameters=hp).hyperparameters == hp


@pytest.mark.parametrize(("hp", "reason"), [
    ({"use_dora": True}, "cannot be served: use_dora"),
    ({"target_modules": ["lm_head"]}, "cannot be served: target module 'lm_head'"),
    ({"adapter": "pissa"}, "hyperparameters.adapter must be one of"),
    ({"use_rslora": "yes"}, "hyperparameters.use_rslora must be true or false"),
    ({"kl_budget": 0.1}, "kl_budget needs kl_steps >= 1"),
    ({"kl_budget": -1.0, "kl_steps": 5}, "kl_budget must be >= 0"),
    ({"kl_budget": 0.1, "kl_steps": 5, "kl_patience": 0}, "kl_patience must be >= 1"),
])
def test_the_spec_refuses_them_too(hp: dict[str, Any], reason: str) -> None:
    # A spec written by hand, or by a daemon of another version, meets the same rule in the trainer.
    with pytest.raises(SpecError, match=reason):
        TrainSpec.from_dict({**BASE, "hyperparameters": hp})


def test_variants_are_part_of_what_is_trained_and_old_hashes_stay() -> None:
    plain = TrainSpec.from_dict(BASE)
    assert TrainSpec.from_dict({**BASE, "hyperparameters": {"adapter": "mica"}}).hyperparameters.adapter == "mica"
    hashes = {spec_hash(TrainSpec.from_dict({**BASE, "hyperparameters": hp}))
              for hp in ({}, {"adapter": "mica"}, {"use_rslora": True}, {"adapter": "mica", "use_rslora": True},
                         {"kl_steps": 5}, {"kl_steps": 5, "kl_budget": 0.05})}
    assert len(hashes) == 6
    # The defaults of the fields added here hash as the spec did before they existed (a resume across an
    # upgrade finds its checkpoints): the canonical form of the old spec, written out.
    assert Hyperparameters().adapter == "lora" and Hyperparameters().use_rslora is False
    old = plain.to_dict()
    for key in ("output_dir", "run_id", "cpu_threads"):
        old.pop(key)
    for key in ("adapter", "use_rslora", "kl_budget", "kl_steps", "validation_max_new_tokens", "kl_patience"):
        old["hyperparameters"].pop(key)
    old.pop("validation")
    canonical = json.dumps(old, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert spec_hash(plain) == hashlib.sha256(canonical.encode()).hexdigest()


def saved(r: int, alpha: float, **extra: Any) -> dict[str, Any]:
    return {"r": r, "lora_alpha": alpha, "use_rslora": False, "init_lora_weights": True, "rank_pattern": {},
            "alpha_pattern": {}, "peft_type": "LORA", **extra}


@pytest.mark.parametrize(("cfg", "alpha", "alpha_pattern"), [
    (saved(16, 32), 32, {}),                                   # plain LoRA: unchanged
    (saved(16, 32, use_rslora=True), 32 * 4, {}),              # alpha*sqrt(r)
    (saved(8, 16, use_rslora=True, rank_pattern={"q_proj": 4}), 16 * math.sqrt(8), {"q_proj": 16 * 2}),
    (saved(4, 8, use_rslora=True, alpha_pattern={"v_proj": 2}), 16, {"v_proj": 4}),
])
def test_rslora_is_saved_as_the_plain_lora_with_the_same_scale(cfg: dict, alpha: float, alpha_pattern: dict) -> None:
    before = json.loads(json.dumps(cfg))
    out = plain_lora_config(cfg)
    assert cfg == before  # the input is not changed
    assert out["use_rslora"] is False
    assert out["lora_alpha"] == pytest.approx(alpha)
    assert out["alpha_pattern"] == pytest.approx(alpha_pattern)
    # What serves (alpha/r of the plain config) is what was trained (alpha/sqrt(r) under rsLoRA).
    trained = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])
    assert out["lora_alpha"] / out["r"] == pytest.approx(trained)
    for module, r in cfg["rank_pattern"].items():
        trained_m = cfg["alpha_pattern"].get(module, cfg["lora_alpha"]) / math.sqrt(r)
        assert out["alpha_pattern"][module] / r == pytest.approx(trained_m)


def test_mica_is_saved_with_a_plain_init() -> None:
    out = plain_lora_config(saved(16, 32, init_lora_weights="mica"))
    assert out["init_lora_weights"] is True and out["lora_alpha"] == 32
