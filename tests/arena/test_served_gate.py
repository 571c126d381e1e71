"""Rule 5 of the gate (the served artifact), as a pure function over measurements."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from academyd.arena.gate import decide
from academyd.settings import ArenaSettings


def rows(losses: list[float]) -> list[dict[str, Any]]:
    return [{"index": i, "loss": v, "tokens": 10} for i, v in enumerate(losses)]


BASE: dict[str, Any] = {
    "heldout": {"candidate": rows([1.0] * 12), "champion": rows([2.0] * 12)},
    "general": {"candidate": rows([1.5] * 8), "champion": rows([1.5] * 8), "base": rows([1.5] * 8)},
    "generation": {"n": 0},
    "runtime": {
        "measured": True, "engine": "llama.cpp", "base_sha256": "ab" * 32, "adapters": {},
        "agreement": {"n": 12, "mean": 0.97, "exact_text": 10},
        "heldout": {"candidate": rows([1.01] * 12), "champion": rows([2.01] * 12)},
        "general": {"candidate": rows([1.5] * 8), "champion": rows([1.5] * 8)},
        "general_answers": {"n": 8, "candidate_chrf": 40.0, "base_chrf": 41.0},
        "generation": {"n": 12},
    },
}


def with_runtime(**changes: Any) -> dict[str, Any]:
    m = copy.deepcopy(BASE)
    m["runtime"].update(changes)
    return m


@pytest.mark.parametrize(("measurement", "rule", "ok"), [
    (BASE, "served_agreement", True),
    (with_runtime(agreement={"n": 12, "mean": 0.4, "exact_text": 0}), "served_agreement", False),
    (with_runtime(heldout={"candidate": rows([2.5] * 12), "champion": rows([2.0] * 12)}), "served_heldout", False),
    (with_runtime(general={"candidate": rows([1.8] * 8), "champion": rows([1.5] * 8)}), "served_forgetting", False),
    (with_runtime(general_answers={"n": 8, "candidate_chrf": 20.0, "base_chrf": 41.0}), "served_general_answers", False),
    (with_runtime(general_answers={"n": 8, "candidate_chrf": 37.0, "base_chrf": 41.0}), "served_general_answers", True),
])
def test_served_rules(measurement: dict[str, Any], rule: str, ok: bool) -> None:
    verdict = decide(measurement, ArenaSettings(bootstrap_samples=200))
    assert verdict.rules[rule] is ok, verdict.reasons
    assert verdict.promote is (ok and all(verdict.rules.values()))


def test_a_base_without_gguf_is_reported_not_judged_and_an_unloadable_adapter_rejects() -> None:
    m = copy.deepcopy(BASE)
    m["runtime"] = {"measured": False, "reason": "the base model /x has no GGUF file"}
    verdict = decide(m, ArenaSettings(bootstrap_samples=200))
    assert verdict.promote and "served" not in verdict.rules
    assert any("served artifact not measured" in r for r in verdict.reasons)
    m["runtime"] = {"measured": False, "refused": True, "reason": "the candidate cannot be served: shape"}
    verdict = decide(m, ArenaSettings(bootstrap_samples=200))
    assert not verdict.promote and verdict.rules["served"] is False
