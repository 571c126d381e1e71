"""The gate and the paired bootstrap: pure functions, table-driven."""

from __future__ import annotations

import random
from typing import Any

import pytest

from academyd.arena import Verdict, decide
from academyd.arena.gate import paired_bootstrap_ci
from academyd.settings import ArenaSettings
from schemas.models import EvaluationFinished

ARENA = ArenaSettings(bootstrap_samples=1000, generation_tolerance=0.02, forgetting_tolerance=0.05, seed=0)


def rows(losses: list[float], tokens: int = 5) -> list[dict[str, Any]]:
    return [{"index": i, "loss": x, "tokens": tokens} for i, x in enumerate(losses)]


def noisy(n: int, mean: float, sd: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [max(0.01, rng.gauss(mean, sd)) for _ in range(n)]


def measurement(cand: list[float], champ: list[float], *, gen: dict[str, Any] | None = None,
                general: tuple[float, float] = (2.0, 2.0), judge: dict[str, Any] | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {
        "heldout": {"candidate": rows(cand), "champion": rows(champ)},
        "general": {"candidate": rows([general[0]] * 10), "champion": rows([general[1]] * 10),
                    "base": rows([3.0] * 10)},
        "generation": gen if gen is not None else {"n": 8, "candidate_exact_match": 0.5, "champion_exact_match": 0.5,
                                                   "candidate_chrf": 60.0, "champion_chrf": 60.0},
    }
    if judge is not None:
        m["judge"] = judge
    return m


BASELINE = noisy(40, 2.0, 0.3, seed=1)
BETTER = [x - 0.5 + d for x, d in zip(BASELINE, noisy(40, 0.0, 0.05, seed=2), strict=True)]
WORSE = [x + 0.4 for x in BASELINE]
# The same mean as the baseline with per-example noise: the CI straddles zero.
SAME = [x + d for x, d in zip(BASELINE, [(-1) ** i * 0.3 for i in range(40)], strict=True)]

CASES = [
    # id, measurement, promote, failed rules
    ("clear improvement", measurement(BETTER, BASELINE), True, set()),
    ("worse loss", measurement(WORSE, BASELINE), False, {"heldout"}),
    ("no significant change", measurement(SAME, BASELINE), False, {"heldout"}),
    ("exact match regresses", measurement(BETTER, BASELINE, gen={
        "n": 8, "candidate_exact_match": 0.25, "champion_exact_match": 0.5, "candidate_chrf": 60.0,
        "champion_chrf": 60.0}), False, {"exact_match"}),
    ("exact match within tolerance", measurement(BETTER, BASELINE, gen={
        "n": 100, "candidate_exact_match": 0.49, "champion_exact_match": 0.5, "candidate_chrf": 60.0,
        "champion_chrf": 60.0}), True, set()),
    ("chrF regresses", measurement(BETTER, BASELINE, gen={
        "n": 8, "candidate_exact_match": 0.5, "champion_exact_match": 0.5, "candidate_chrf": 55.0,
        "champion_chrf": 60.0}), False, {"chrf"}),
    ("forgetting beyond 5%", measurement(BETTER, BASELINE, general=(2.2, 2.0)), False, {"forgetting"}),
    ("forgetting within 5%", measurement(BETTER, BASELINE, general=(2.08, 2.0)), True, set()),
    ("judge prefers champion", measurement(BETTER, BASELINE, judge={
        "n": 8, "candidate_wins": 1, "champion_wins": 5, "ties": 2}), False, {"judge"}),
    ("judge even", measurement(BETTER, BASELINE, judge={
        "n": 8, "candidate_wins": 3, "champion_wins": 3, "ties": 2}), True, set()),
    ("non-finite candidate", measurement([float("nan")] * 40, BASELINE), False, {"heldout"}),
    ("nothing scored", measurement([], []), False, {"heldout"}),
]


@pytest.mark.parametrize(("measured", "promote", "failed"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_gate_table(measured: dict[str, Any], promote: bool, failed: set[str]) -> None:
    verdict = decide(measured, ARENA, champion="v1")
    assert verdict.promote is promote, verdict.reasons
    assert {k for k, ok in verdict.rules.items() if not ok} == failed
    assert len(verdict.reasons) >= 3  # one per rule, whatever the outcome


def test_verdict_carries_ci_and_fits_the_event_schema() -> None:
    verdict = decide(measurement(BETTER, BASELINE), ARENA, champion=None)
    held = verdict.metrics["heldout"]
    assert held["ci_low"] > 0 and held["ci_low"] <= held["improvement"] <= held["ci_high"]
    assert held["improvement"] == pytest.approx(0.5, abs=0.05)
    assert verdict.metrics["champion"] == "base"
    assert "the base model" in verdict.reasons[0]
    EvaluationFinished.model_validate({"schema_version": 1, "event_id": "e1", "at": "2026-01-01T00:00:00+00:00",
                                       "version": "v1", **verdict.to_event()})
    assert isinstance(verdict, Verdict) and verdict.to_event()["verdict"] == "promote"


def test_bootstrap_is_seeded_and_weighted() -> None:
    diffs = noisy(30, 0.2, 0.5, seed=3)
    weights = [1 + i % 4 for i in range(30)]
    a = paired_bootstrap_ci(diffs, weights, samples=500, seed=5)
    assert a == paired_bootstrap_ci(diffs, weights, samples=500, seed=5)
    point = sum(d * w for d, w in zip(diffs, weights, strict=True)) / sum(weights)
    assert a[0] == pytest.approx(point)
    assert a[1] < point < a[2]
    # A constant difference has a zero-width interval.
    assert paired_bootstrap_ci([0.3] * 10, [1] * 10, samples=200, seed=0) == pytest.approx((0.3, 0.3, 0.3))
    with pytest.raises(ValueError, match="no paired examples"):
        paired_bootstrap_ci([], [], samples=100, seed=0)


def test_examples_are_paired_by_index() -> None:
    """Only examples scored for both sides count (one side may have skipped some)."""
    m = measurement(BETTER, BASELINE)
    m["heldout"]["candidate"] = m["heldout"]["candidate"][5:]
    verdict = decide(m, ARENA)
    assert verdict.metrics["heldout"]["examples"] == 35


async def test_judge_counts_only_consistent_wins() -> None:
    """A real HTTP judge (OpenAI-compatible) with a position bias: it always says A unless one answer is empty."""
    from aiohttp import web

    from academyd.arena.judge import judge, parse_choice

    seen: list[str] = []

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        prompt = body["messages"][0]["content"]
        seen.append(body["model"])
        a = prompt.split("Answer A:\n", 1)[1].split("\n\nAnswer B:", 1)[0]
        b = prompt.split("Answer B:\n", 1)[1].split("\n\nWhich", 1)[0]
        choice = "B" if not a.strip() else "A" if b.strip() else "A"
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": f"{choice}."}}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        examples = [
            {"question": "q1", "candidate": "good", "champion": ""},   # candidate wins in both orders
            {"question": "q2", "candidate": "", "champion": "good"},   # champion wins in both orders
            {"question": "q3", "candidate": "x", "champion": "y"},     # position bias: A both times
        ]
        result = await judge(examples, url=url, model="judge-1", timeout_s=10)
    finally:
        await runner.cleanup()
    assert (result["candidate_wins"], result["champion_wins"], result["ties"]) == (1, 1, 1)
    assert result["decisions"][2] == ["A", "A"] and len(seen) == 6
    assert [parse_choice(t) for t in ("B", "answer: a", "Tie", "no idea")] == ["B", "A", "TIE", "TIE"]


def test_the_verdict_reports_the_candidates_kl_to_the_base_beside_the_general_set_loss() -> None:
    m = measurement(BETTER, BASELINE, general=(2.08, 2.0))
    m["training"] = {"general_kl": 0.0123, "kl_budget": 0.05}
    verdict = decide(m, ARENA, champion="v1")
    forgetting = verdict.to_event()["metrics"]["forgetting"]
    assert forgetting["candidate_kl"] == 0.0123 and forgetting["kl_budget"] == 0.05
    assert forgetting["relative_change"] == pytest.approx(0.04)
    reason = next(r for r in verdict.reasons if r.startswith("general-set loss"))
    assert "KL to the base 0.0123 nats/token of a budget of 0.0500" in reason, reason
    EvaluationFinished.model_validate({"schema_version": 1, "event_id": "e1", "at": "2026-01-01T00:00:00+00:00",
                                       "version": "v2", **verdict.to_event()})
    # It is reported, not judged: the same verdict without it.
    plain = decide(measurement(BETTER, BASELINE, general=(2.08, 2.0)), ARENA, champion="v1")
    assert plain.rules == verdict.rules and "candidate_kl" not in plain.metrics["forgetting"]
    assert "KL" not in next(r for r in plain.reasons if r.startswith("general-set loss"))
