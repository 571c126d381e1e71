"""The gate's decisions on real adapters in real llama.cpp (#18): the table of cases the issue asks for.

A dataset is built by the curator from lessons no recipe was tuned on (tests/fixtures/polish.py: 10 facts,
6 Polish phrasings each, every phrasing taught twice with two answer wordings); real LoRA adapters on
SmolLM2 are trained on its training file (tests/fixtures/build_gate_adapters.py), and each is judged by the
daemon's own arena (`academyd.arena.contest.evaluate`: the measurement in the trainer's environment, the
checkable held-out questions asked through the GGUF adapter in llama.cpp as Venom asks, the gate) against
the base model:

| adapter | what it learnt | verdict |
|---|---|---|
| one_answer | one fact, in the taught wording, for every question | refused: collapse, no gain in right answers |
| wording | the wording with the wrong facts: held-out loss far lower | refused: no gain in right answers |
| both | moved far from the base on the general set | refused: forgetting beyond tolerance |

Measured here (2-core VM, busy): one_answer 14 of 16 held-out replies the same string, 2/16 right vs the
base's 0/16 (p = 0.5), general-set loss +51 %; wording held-out loss 1.67 vs 4.46 nats/token (CI above
zero: the issue's v1 would have been promoted), 0/16 right, general-set loss +31 %.

"More right answers -> promote" is the real loop's case (tests/model/test_real_loop.py), judged by the same
gate on the house facts.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from fixtures.gate_real import GateReal

# Training two adapters and two arena measurements (tests/fixtures/gate_real.py, shared with
# tests/scale/test_eval_jobs.py): about 5 minutes on 2 idle cores, far more on busy ones.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def judged(gate_real: GateReal) -> dict[str, Any]:
    return {"verdicts": gate_real.verdicts, "built": gate_real.built, "manifest": gate_real.manifest}


def _failing(v: Any) -> set[str]:
    return {k for k, ok in v.rules.items() if not ok}


def test_one_answer_for_everything_is_refused_for_collapse(judged: dict[str, Any]) -> None:
    v = judged["verdicts"]["one_answer"]
    assert not v.promote, v.reasons
    assert "no_collapse" in _failing(v) and "right_answers" in _failing(v), v.reasons
    assert any(r.startswith("collapse") and "02:40" in r for r in v.reasons), v.reasons
    assert v.metrics["right_answers"]["engine"] == "llama.cpp"  # asked of the serving artifact
    print("one_answer:", json.dumps(v.metrics["right_answers"]), json.dumps(
        {k: v.metrics["collapse"][k] for k in ("diversity", "dominant_share", "top_reply_count", "questions")}))


def test_the_wording_without_the_facts_is_refused(judged: dict[str, Any]) -> None:
    v = judged["verdicts"]["wording"]
    assert not v.promote, v.reasons
    assert "right_answers" in _failing(v), v.reasons
    ra = v.metrics["right_answers"]
    assert ra["families"] >= 8 and ra["p_value"] > 0.05, ra
    # the failure: far lower held-out loss, which alone would have promoted it; reported, not deciding
    assert v.metrics["supporting_rules"]["heldout"] is True, v.metrics["heldout"]
    print("wording:", json.dumps(ra), "held-out loss", json.dumps(v.metrics["heldout"]))


def test_forgetting_beyond_tolerance_is_refused(judged: dict[str, Any]) -> None:
    for name, v in judged["verdicts"].items():
        assert not v.promote and v.rules["forgetting"] is False, (name, v.reasons)
        assert v.metrics["forgetting"]["relative_change"] > 0.05, (name, v.metrics["forgetting"])
        print(name, "forgetting:", json.dumps(v.metrics["forgetting"]))
