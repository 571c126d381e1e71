"""The gate: a pure function from the arena's measurements to a verdict (promote or not, and why).

Rules (all must pass to promote; every rule adds one reason either way):

1. Held-out loss. The improvement is the token-weighted mean of (champion loss - candidate loss) over the
   held-out examples, both scored on the same tokens (nats per response token). Its 95 % confidence
   interval comes from a paired bootstrap (`bootstrap_samples` resamples of the examples, percentile
   interval, seeded). Promote only when the whole interval lies above zero.
2. Generation. On the generation sample, neither exact match (fraction) nor chrF (sacrebleu's corpus chrF,
   divided by 100) of the candidate may fall below the champion's by more than `generation_tolerance`.
3. Forgetting. On the general set shipped with the project, the candidate's loss may not exceed the
   champion's by more than `forgetting_tolerance` relative to it (0.05: 5 % worse). Reported beside it, not
   a rule: the candidate's mean KL to the base on that set (its training summary's general_kl, and kl_budget).
4. Judge (only when measured). Of the sampled questions, the champion's consistent wins (it wins in both
   answer orders) may not exceed the candidate's by more than `generation_tolerance` x the sample size.

5. The served artifact (when `measure` ran llama.cpp: `measurement["runtime"]["measured"]`):
   a. agreement: the teacher-forced top-1 agreement of llama.cpp with the trainer's greedy answers on the
      frozen probes is at least `served_agreement_min` (a wrong export, another run's adapter, another
      base fall far below it);
   b. held-out loss in the runtime: the same paired-bootstrap rule as 1, on the runtime's losses;
   c. forgetting in the runtime: its general-set loss within `forgetting_tolerance` of the champion's;
   d. general answers: chrF (/100) of the candidate's greedy answers to the general sample at most
      `general_answer_tolerance` below the base model's.
   A runtime that was asked for and could not load the adapter (`refused`) rejects; a base without a GGUF
   is reported and not judged by these rules.

6. Right answers (when the held-out set has checkable answers: the curator's checks file, see
   academyd.arena.answers). The arena asks every checkable held-out question (up to `answer_sample`) of the
   candidate and the champion through the serving artifact, as Venom asks (its system prompt, the question as
   chat messages, greedy), and scores each reply right or wrong against the answer's keys. Per held-out family
   (questions never trained on) the share of right replies is compared; promotion needs more families better
   than worse, significant at `right_answers_alpha` in a one-sided exact sign test over families. Then rules
   1, 2 and 5b (loss, exact match, chrF: they reward the answers' wording) are reported as supporting
   evidence and no longer decide.
7. No collapse (with right answers): refused when the candidate's distinct replies are fewer than
   `collapse_min_diversity` of the references' own, or when one fact's answer is given to more than
   `collapse_max_dominant` of the questions about other facts.
0. Evidence: fewer held-out families than `min_heldout_families` (checkable ones, when there are any) is no
   verdict at all: "insufficient evidence", with how many more lessons would be enough; the champion stays.

"Champion" is the base model when there is no champion yet. Non-finite losses always reject.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from academyd.arena.answers import collapse, is_right, sign_test
from academyd.settings import ArenaSettings


@dataclass
class Verdict:
    """The arena's decision. `metrics` holds every number the decision used (see `decide`)."""

    promote: bool
    reasons: list[str]
    metrics: dict[str, Any]
    champion: str | None = None  # the version compared with; None: the base model
    rules: dict[str, bool] = field(default_factory=dict)

    def to_event(self) -> dict[str, Any]:
        """The verdict part of `academy.evaluation.finished` (the registry adds ids, version and time)."""
        return {
            "verdict": "promote" if self.promote else "reject",
            "champion": self.champion,
            "reasons": list(self.reasons),
            "metrics": {**self.metrics, "rules": dict(self.rules)},
        }


def paired_bootstrap_ci(
    diffs: list[float], weights: list[float], *, samples: int, seed: int, level: float = 0.95
) -> tuple[float, float, float]:
    """(point, low, high) of the weighted mean of paired differences, percentile bootstrap over examples."""
    d = np.asarray(diffs, dtype=float)
    w = np.asarray(weights, dtype=float)
    if d.size == 0 or w.sum() <= 0:
        raise ValueError("no paired examples to bootstrap")
    point = float((d * w).sum() / w.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(samples, d.size))
    stats = (d[idx] * w[idx]).sum(axis=1) / np.maximum(w[idx].sum(axis=1), 1e-12)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return point, float(low), float(high)


def _weighted_loss(rows: list[dict[str, Any]]) -> float:
    tokens = sum(r["tokens"] for r in rows)
    return sum(r["loss"] * r["tokens"] for r in rows) / tokens if tokens else float("nan")


def _ppl(loss: float) -> float:
    return math.exp(loss) if math.isfinite(loss) and loss < 50 else float("inf")


def decide(measurement: dict[str, Any], arena: ArenaSettings, *, champion: str | None = None) -> Verdict:
    """Apply the gate to a measurement (the JSON `academyd.arena.measure` prints, plus `judge` if any).

    `measurement` keys: `heldout` {candidate: [{index, loss, tokens}], champion: [...]},
    `general` {candidate: [...], champion: [...], base: [...]}, `generation` {n, candidate_exact_match,
    champion_exact_match, candidate_chrf, champion_chrf}, optional `judge` {n, candidate_wins,
    champion_wins, ties}, optional `training` {general_kl, kl_budget} (the candidate's training summary).
    """
    name = champion or "the base model"
    reasons: list[str] = []
    rules: dict[str, bool] = {}
    metrics: dict[str, Any] = {"champion": champion or "base"}

    # 1. held-out loss, paired by example index
    cand = {r["index"]: r for r in measurement["heldout"]["candidate"]}
    champ = {r["index"]: r for r in measurement["heldout"]["champion"]}
    common = sorted(set(cand) & set(champ))
    cand_rows = [cand[i] for i in common]
    champ_rows = [champ[i] for i in common]
    cand_loss, champ_loss = _weighted_loss(cand_rows), _weighted_loss(champ_rows)
    held: dict[str, Any] = {
        "examples": len(common),
        "tokens": sum(r["tokens"] for r in cand_rows),
        "candidate_loss": cand_loss,
        "champion_loss": champ_loss,
        "candidate_perplexity": _ppl(cand_loss),
        "champion_perplexity": _ppl(champ_loss),
    }
    if not common:
        rules["heldout"] = False
        reasons.append("no held-out example could be scored: cannot show an improvement")
    elif not all(math.isfinite(r["loss"]) for r in cand_rows):
        rules["heldout"] = False
        reasons.append("the candidate's held-out loss is not finite (the adapter is broken)")
    else:
        diffs = [c["loss"] - k["loss"] for c, k in zip(champ_rows, cand_rows, strict=True)]
        weights = [k["tokens"] for k in cand_rows]
        point, low, high = paired_bootstrap_ci(diffs, weights, samples=arena.bootstrap_samples, seed=arena.seed)
        held.update(improvement=point, ci_low=low, ci_high=high, bootstrap_samples=arena.bootstrap_samples)
        rules["heldout"] = low > 0
        if low > 0:
            reasons.append(f"held-out loss {cand_loss:.4f} vs {champ_loss:.4f} ({name}): improvement {point:.4f} "
                           f"nats/token, 95% CI [{low:.4f}, {high:.4f}] above zero")
        else:
            reasons.append(f"held-out loss {cand_loss:.4f} vs {champ_loss:.4f} ({name}): improvement {point:.4f} "
                           f"nats/token, 95% CI [{low:.4f}, {high:.4f}] does not lie above zero")
    metrics["heldout"] = held

    # 2. generation
    gen = measurement.get("generation") or {}
    metrics["generation"] = {k: v for k, v in gen.items() if k != "examples"}
    if gen.get("n"):
        tol = arena.generation_tolerance
        em_c, em_k = gen["candidate_exact_match"], gen["champion_exact_match"]
        chrf_c, chrf_k = gen["candidate_chrf"] / 100.0, gen["champion_chrf"] / 100.0
        ok_em = em_c >= em_k - tol
        ok_chrf = chrf_c >= chrf_k - tol
        rules["exact_match"], rules["chrf"] = ok_em, ok_chrf
        reasons.append(f"exact match {em_c:.3f} vs {em_k:.3f} on {gen['n']} generations: "
                       + ("within tolerance" if ok_em else f"regressed by more than {tol}"))
        reasons.append(f"chrF {chrf_c * 100:.1f} vs {chrf_k * 100:.1f}: "
                       + ("within tolerance" if ok_chrf else f"regressed by more than {tol * 100:.1f}"))
    else:
        reasons.append("generation not measured (generation_sample is 0)")

    # 3. forgetting on the general set; beside it the candidate's KL to the base there (its training summary)
    general = measurement.get("general") or {}
    kl = _training_kl(measurement.get("training"))
    if general.get("candidate") and general.get("champion"):
        g_c, g_k = _weighted_loss(general["candidate"]), _weighted_loss(general["champion"])
        rel = (g_c - g_k) / g_k if g_k > 0 else float("inf")
        ok = math.isfinite(g_c) and rel <= arena.forgetting_tolerance
        metrics["forgetting"] = {"candidate_loss": g_c, "champion_loss": g_k, "relative_change": rel,
                                 "examples": len(general["candidate"])}
        if general.get("base"):
            metrics["forgetting"]["base_loss"] = _weighted_loss(general["base"])
        metrics["forgetting"].update(kl)
        rules["forgetting"] = ok
        reasons.append(f"general-set loss {g_c:.4f} vs {g_k:.4f} ({rel:+.1%}{_kl_text(kl)}): "
                       + ("no forgetting beyond tolerance" if ok
                          else f"forgets: worse by more than {arena.forgetting_tolerance:.0%}"))
    else:
        rules["forgetting"] = False
        if kl:
            metrics["forgetting"] = dict(kl)
        reasons.append("the forgetting check did not run: the general set was not measured" + _kl_text(kl))

    # 4. judge
    judge = measurement.get("judge")
    if judge and judge.get("n"):
        margin = judge["champion_wins"] - judge["candidate_wins"]
        ok = margin <= arena.generation_tolerance * judge["n"]
        metrics["judge"] = dict(judge)
        rules["judge"] = ok
        reasons.append(f"judge: candidate {judge['candidate_wins']} consistent wins, {name} {judge['champion_wins']}, "
                       f"{judge.get('ties', 0)} ties or inconsistent: " + ("ok" if ok else "the champion is preferred"))
    elif judge is not None:
        metrics["judge"] = dict(judge)

    _served(measurement.get("runtime"), arena, name, rules, reasons, metrics)
    checked = _right_answers(measurement, arena, name, rules, reasons, metrics)
    if checked:
        # Right answers decide; loss, exact match and chrF reward the answers' wording and stay as evidence.
        supporting = {k: rules.pop(k) for k in SUPPORTING if k in rules}
        metrics["supporting_rules"] = supporting
    _evidence(measurement, arena, checked, rules, reasons, metrics)
    return Verdict(promote=all(rules.values()) and bool(rules), reasons=reasons, metrics=metrics,
                   champion=champion, rules=rules)


SUPPORTING = ("heldout", "exact_match", "chrf", "served_heldout")


def _training_kl(training: Any) -> dict[str, Any]:
    """The candidate's mean KL(candidate || base) per response token on the general set, from its training
    summary (academyd.trainer: measured on the adapter it wrote), with the budget it trained under."""
    if not isinstance(training, dict):
        return {}
    kl = training.get("general_kl")
    if not isinstance(kl, (int, float)) or isinstance(kl, bool) or not math.isfinite(kl):
        return {}
    out: dict[str, Any] = {"candidate_kl": float(kl)}
    if isinstance(training.get("kl_budget"), (int, float)) and training["kl_budget"]:
        out["kl_budget"] = float(training["kl_budget"])
    return out


def _kl_text(kl: dict[str, Any]) -> str:
    if not kl:
        return ""
    budget = f" of a budget of {kl['kl_budget']:.4f}" if "kl_budget" in kl else ""
    return f"; KL to the base {kl['candidate_kl']:.4f} nats/token{budget}"


def _evidence(measurement: dict[str, Any], arena: ArenaSettings, checked: int, rules: dict[str, bool],
              reasons: list[str], metrics: dict[str, Any]) -> None:
    """Rule 0: enough held-out families for a verdict (checkable ones when there are any)."""
    fam = measurement.get("families")
    if not isinstance(fam, dict) and not checked:
        return  # a measurement without the curator's family counts (an older dataset): not judged here
    families = checked or int((fam or {}).get("heldout") or 0)
    need = arena.min_heldout_families
    per_family = float((fam or {}).get("mean_size") or 1.0)
    fraction = float((fam or {}).get("heldout_fraction") or 0.1)
    # The curator holds out at least min(need, a quarter of the families): below 4 x need families each new
    # family adds a quarter of a held-out one, above it `fraction` of one. What is missing, in lessons.
    total = int((fam or {}).get("train") or 0) + int((fam or {}).get("heldout") or 0)
    rate = 0.25 if total < 4 * need or fraction <= 0 else fraction
    lessons_needed = math.ceil((need - families) * per_family / rate) if families < need else 0
    metrics["evidence"] = {"heldout_families": families, "needed": need, "checkable": bool(checked),
                           "lessons_needed": lessons_needed}
    ok = families >= need
    rules["evidence"] = ok
    what = "held-out families with a checkable answer" if checked else "held-out families"
    if ok:
        reasons.append(f"evidence: {families} {what} (at least {need} needed)")
    else:
        reasons.append(f"insufficient evidence: {families} {what}, at least {need} needed (arena.min_heldout_families); "
                       f"about {max(lessons_needed, 1)} more lessons that ask new questions would be enough; "
                       "the champion stays")


def _right_answers(measurement: dict[str, Any], arena: ArenaSettings, name: str, rules: dict[str, bool],
                   reasons: list[str], metrics: dict[str, Any]) -> int:
    """Rules 6 and 7: more right answers than the champion on held-out families (exact sign test), and no
    collapse onto one answer. Returns the number of checkable families answered (0: not judged)."""
    checks = measurement.get("checks") or []
    got = measurement.get("answers") or {}
    cand, champ = got.get("candidate") or {}, got.get("champion") or {}
    rows = [c for c in checks if str(c["index"]) in cand and str(c["index"]) in champ]
    if not rows:
        if checks:
            rules["right_answers"] = False
            reasons.append("right answers could not be measured: the arena got no answers to the checkable "
                           "held-out questions")
            return len({c["family"] for c in checks})
        return 0
    by_family: dict[str, list[tuple[bool, bool]]] = {}
    for c in rows:
        by_family.setdefault(c["family"], []).append(
            (is_right(cand[str(c["index"])], c["keys"]), is_right(champ[str(c["index"])], c["keys"])))
    wins = losses = 0
    fam_right = {"candidate": 0, "champion": 0}
    for pairs in by_family.values():
        c_rate = sum(a for a, _ in pairs) / len(pairs)
        k_rate = sum(b for _, b in pairs) / len(pairs)
        wins += c_rate > k_rate
        losses += c_rate < k_rate
        fam_right["candidate"] += c_rate > 0.5
        fam_right["champion"] += k_rate > 0.5
    q_right = {"candidate": sum(a for p in by_family.values() for a, _ in p),
               "champion": sum(b for p in by_family.values() for _, b in p)}
    p_value = sign_test(wins, losses)
    n_fam, n_q = len(by_family), len(rows)
    ok = wins > losses and p_value <= arena.right_answers_alpha
    rules["right_answers"] = ok
    metrics["right_answers"] = {
        "engine": got.get("engine"), "families": n_fam, "questions": n_q, "better": wins, "worse": losses,
        "p_value": p_value, "alpha": arena.right_answers_alpha,
        "candidate_right": q_right["candidate"], "champion_right": q_right["champion"],
        "candidate_families_right": fam_right["candidate"], "champion_families_right": fam_right["champion"],
    }
    reasons.append(
        f"right answers on {n_fam} held-out families ({n_q} questions, asked as Venom asks, {got.get('engine')}): "
        f"candidate {q_right['candidate']}/{n_q}, {name} {q_right['champion']}/{n_q}; better in {wins} families, "
        f"worse in {losses}, one-sided exact sign test p={p_value:.4f} "
        + (f"<= {arena.right_answers_alpha}: a significant gain" if ok
           else f"> {arena.right_answers_alpha}: no significant gain in right answers"))
    col = collapse([{"reply": cand[str(c["index"])], "reference": c["reference"], "keys": c["keys"]} for c in rows])
    metrics["collapse"] = col
    if col["questions"] >= 4 and col["distinct_references"] >= 2:
        few = col["diversity"] < arena.collapse_min_diversity
        one = col["dominant_share"] > arena.collapse_max_dominant
        rules["no_collapse"] = not (few or one)
        if few:
            reasons.append(f"collapse: {col['distinct_replies']} distinct answers to {col['questions']} held-out "
                           f"questions whose references have {col['distinct_references']} "
                           f"(diversity {col['diversity']:.2f} < {arena.collapse_min_diversity}); most common, "
                           f"{col['top_reply_count']} times: {col['top_reply']!r}")
        if one:
            reasons.append(f"collapse: the answer of one fact ({', '.join(col['dominant_fact'] or [])}) is given to "
                           f"{col['dominant_share']:.0%} of the questions about other facts "
                           f"(> {arena.collapse_max_dominant:.0%})")
        if not (few or one):
            reasons.append(f"answers stay diverse: {col['distinct_replies']} distinct for "
                           f"{col['distinct_references']} distinct references; no fact given to more than "
                           f"{col['dominant_share']:.0%} of the questions about others")
    return n_fam


def _served(rt: dict[str, Any] | None, arena: ArenaSettings, name: str, rules: dict[str, bool],
            reasons: list[str], metrics: dict[str, Any]) -> None:
    """Rule 5: the GGUF adapter on the GGUF base in llama.cpp."""
    if rt is None:
        return
    if not rt.get("measured"):
        metrics["served"] = {"measured": False, "reason": rt.get("reason")}
        if rt.get("refused"):
            rules["served"] = False
            reasons.append(f"served artifact refused: {rt.get('reason')}")
        else:
            reasons.append(f"served artifact not measured: {rt.get('reason')}")
        return
    served: dict[str, Any] = {"measured": True, "engine": rt.get("engine"), "base_sha256": rt.get("base_sha256"),
                              "adapters": rt.get("adapters"), "probes_path": rt.get("probes_path"),
                              "timings": rt.get("timings")}
    agree = rt.get("agreement") or {}
    mean = agree.get("mean")
    ok = isinstance(mean, (int, float)) and math.isfinite(mean) and mean >= arena.served_agreement_min
    rules["served_agreement"] = ok
    served["agreement"] = agree
    reasons.append(f"served (llama.cpp) agrees with the trainer on {mean if mean is not None else float('nan'):.1%} "
                   f"of greedy tokens over {agree.get('n', 0)} frozen probes ({agree.get('exact_text', 0)} identical "
                   f"texts): " + ("ok" if ok else f"below {arena.served_agreement_min:.0%}, the served artifact "
                                  "is not what was trained"))
    held = rt.get("heldout") or {}
    cand = {r["index"]: r for r in held.get("candidate") or []}
    champ = {r["index"]: r for r in held.get("champion") or []}
    common = sorted(set(cand) & set(champ))
    if common and all(math.isfinite(cand[i]["loss"]) for i in common):
        diffs = [champ[i]["loss"] - cand[i]["loss"] for i in common]
        point, low, high = paired_bootstrap_ci(diffs, [cand[i]["tokens"] for i in common],
                                               samples=arena.bootstrap_samples, seed=arena.seed)
        c_loss = _weighted_loss([cand[i] for i in common])
        k_loss = _weighted_loss([champ[i] for i in common])
        served["heldout"] = {"candidate_loss": c_loss, "champion_loss": k_loss, "improvement": point,
                             "ci_low": low, "ci_high": high, "examples": len(common)}
        rules["served_heldout"] = low > 0
        reasons.append(f"served held-out loss {c_loss:.4f} vs {k_loss:.4f} ({name}): improvement {point:.4f}, "
                       f"95% CI [{low:.4f}, {high:.4f}] " + ("above zero" if low > 0 else "does not lie above zero"))
    else:
        rules["served_heldout"] = False
        reasons.append("served held-out loss could not be measured (no finite paired examples)")
    general = rt.get("general") or {}
    if general.get("candidate") and general.get("champion"):
        g_c, g_k = _weighted_loss(general["candidate"]), _weighted_loss(general["champion"])
        rel = (g_c - g_k) / g_k if g_k > 0 else float("inf")
        ok = math.isfinite(g_c) and rel <= arena.forgetting_tolerance
        served["forgetting"] = {"candidate_loss": g_c, "champion_loss": g_k, "relative_change": rel,
                                "base_loss": _weighted_loss(general.get("base") or general["champion"])}
        rules["served_forgetting"] = ok
        reasons.append(f"served general-set loss {g_c:.4f} vs {g_k:.4f} ({rel:+.1%}): "
                       + ("no forgetting beyond tolerance" if ok else
                          f"forgets: worse by more than {arena.forgetting_tolerance:.0%}"))
    ga = rt.get("general_answers") or {}
    if ga.get("n"):
        c, b = ga["candidate_chrf"] / 100.0, ga["base_chrf"] / 100.0
        ok = c >= b - arena.general_answer_tolerance
        served["general_answers"] = {k: v for k, v in ga.items() if k != "examples"}
        rules["served_general_answers"] = ok
        reasons.append(f"served general answers chrF {c * 100:.1f} vs base {b * 100:.1f} on {ga['n']} questions: "
                       + ("ok" if ok else f"worse than the base by more than {arena.general_answer_tolerance * 100:.1f}"))
    sg = rt.get("generation") or {}
    served["generation"] = {k: v for k, v in sg.items() if k != "examples"}
    metrics["served"] = served
