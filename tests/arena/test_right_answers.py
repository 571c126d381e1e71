"""Right answers as the gate's criterion: keys, scoring, the exact sign test over families, collapse and evidence.

Pure and table-driven. The cases are the issue's: a candidate that learnt the answers' wording and one answer
for all had lower held-out loss and was promoted; now it is refused, and so is one with the same right
answers and lower loss, and one with too few held-out families to judge.
"""

from __future__ import annotations

from typing import Any

import pytest

from academyd.arena import decide
from academyd.arena.answers import answer_keys, is_right, sign_test, template_words
from academyd.settings import ArenaSettings
from fixtures.polish import FACTS

ARENA = ArenaSettings(bootstrap_samples=500, seed=0)  # defaults: min 8 families, alpha 0.05


def rows(losses: list[float]) -> list[dict[str, Any]]:
    return [{"index": i, "loss": x, "tokens": 5} for i, x in enumerate(losses)]


def checks(n_facts: int = 10, per_fact: int = 2) -> list[dict[str, Any]]:
    """One held-out family per fact (its first question), `per_fact` questions in it (the twins)."""
    template = template_words([[f["answer"], "Właściwa odpowiedź to: " + f["answer"]] for f in FACTS])
    out = []
    for f, fact in enumerate(FACTS[:n_facts]):
        q = fact["questions"][0]
        keys = answer_keys(q, [fact["answer"], "Właściwa odpowiedź to: " + fact["answer"]], template)
        for j in range(per_fact):
            out.append({"index": len(out), "family": f"fam-{f}", "question": q, "reference": fact["answer"],
                        "keys": keys, "fact": f})
    return out


def measurement(cand: dict[int, str], champ: dict[int, str], chk: list[dict[str, Any]], *,
                loss: tuple[float, float] = (1.0, 3.0), general: tuple[float, float] = (2.0, 2.0),
                families: int | None = None) -> dict[str, Any]:
    n = len(chk)
    return {
        "heldout": {"candidate": rows([loss[0] + 0.01 * (i % 3) for i in range(n)]),
                    "champion": rows([loss[1] + 0.01 * (i % 2) for i in range(n)])},
        "general": {"candidate": rows([general[0]] * 10), "champion": rows([general[1]] * 10), "base": rows([2.0] * 10)},
        "generation": {"n": 4, "candidate_exact_match": 0.0, "champion_exact_match": 0.0,
                       "candidate_chrf": 40.0, "champion_chrf": 10.0},
        "checks": chk,
        "answers": {"engine": "llama.cpp", "candidate": {str(k): v for k, v in cand.items()},
                    "champion": {str(k): v for k, v in champ.items()}},
        "families": {"heldout": families if families is not None else len({c["family"] for c in chk}),
                     "train": 50, "mean_size": 2.0, "heldout_fraction": 0.1},
    }


CHK = checks()
BASE = {c["index"]: "Nie wiem, nie mam takiej informacji." for c in CHK}
KNOWS = {c["index"]: "Właściwa odpowiedź to: " + FACTS[c["fact"]]["answer"] + "." for c in CHK}
# the v1: the taught wording and one fact's answer for everything
ONE_ANSWER = {c["index"]: "Właściwa odpowiedź to: kopia zapasowa startuje o 02:40." for c in CHK}
# the wording without the facts: lower loss, no right answer
WORDING = {c["index"]: f"Właściwa odpowiedź to: {c['question'].rstrip('?.').lower()}." for c in CHK}
HALF = {c["index"]: (KNOWS if c["fact"] % 2 == 0 else BASE)[c["index"]] for c in CHK}

CASES = [
    # id, candidate answers, champion answers, extra, promote, failing rules
    ("more right answers", KNOWS, BASE, {}, True, set()),
    ("more right answers, five of ten families", HALF, BASE, {}, True, set()),
    ("same right answers, lower loss", WORDING, BASE, {}, False, {"right_answers"}),
    ("one answer for all", ONE_ANSWER, BASE, {}, False, {"right_answers", "no_collapse"}),
    ("forgetting beyond tolerance", KNOWS, BASE, {"general": (2.3, 2.0)}, False, {"forgetting"}),
    # one "I do not know" for everything is a collapse too
    ("worse than the champion", BASE, KNOWS, {"loss": (3.0, 1.0)}, False, {"right_answers", "no_collapse"}),
]


@pytest.mark.parametrize(("cand", "champ", "extra", "promote", "failing"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_the_gate_decides_on_right_answers(cand: dict[int, str], champ: dict[int, str], extra: dict[str, Any],
                                           promote: bool, failing: set[str]) -> None:
    v = decide(measurement(cand, champ, CHK, **extra), ARENA)
    assert v.promote is promote, v.reasons
    assert {k for k, ok in v.rules.items() if not ok} == failing, v.reasons
    assert "right_answers" in v.rules and "evidence" in v.rules
    # loss and chrF are reported, never deciding when answers can be checked
    assert "heldout" in v.metrics["supporting_rules"] and "heldout" not in v.rules


def test_the_collapse_reason_names_the_one_answer() -> None:
    v = decide(measurement(ONE_ANSWER, BASE, CHK), ARENA)
    text = " ".join(v.reasons)
    assert "collapse" in text and "02:40" in text
    assert v.metrics["collapse"]["distinct_replies"] == 1


def test_too_few_families_is_insufficient_evidence_and_says_what_is_enough() -> None:
    few = checks(n_facts=5)
    v = decide(measurement({c["index"]: KNOWS[c["index"]] for c in few}, BASE, few), ARENA)
    assert not v.promote and v.rules["evidence"] is False
    reason = next(r for r in v.reasons if r.startswith("insufficient evidence"))
    assert "5 held-out families" in reason and "at least 8" in reason and "more lessons" in reason
    assert v.metrics["evidence"]["lessons_needed"] > 0


def test_without_checkable_answers_the_loss_still_decides() -> None:
    m = measurement({}, {}, [{"index": i, "family": f"fam-{i}"} for i in range(12)])
    m.pop("checks"), m.pop("answers")
    m["families"]["heldout"] = 12
    v = decide(m, ARENA)
    assert v.promote and "heldout" in v.rules and "right_answers" not in v.rules


@pytest.mark.parametrize(("reply", "keys", "right"), [
    ("Serwer bazy to modrzew.", ["modrzew"], True),
    ("Baza stoi na modrzewiu.", ["modrzew"], True),  # an inflected form
    ("MODRZEW!", ["modrzew"], True),
    ("Baza stoi na serwerze sosna.", ["modrzew"], False),
    ("Dyżur ma Halina Sowa.", ["halina", "sowa"], True),
    ("Dyżur ma Sowa.", ["halina", "sowa"], True),  # half of the keys
    ("Kopia startuje o 02:40.", ["02:40"], True),
    ("Kopia startuje o 2:40.", ["02:40"], False),
    ("Zobacz kanał #venom-alarmy, tam są alerty.", ["#venom-alarmy"], True),
    ("Every commit starts with VEN-1234: a ticket.", ["ven-"], True),
    ("Anything", [], False),
])
def test_is_right(reply: str, keys: list[str], right: bool) -> None:
    assert is_right(reply, keys) is right


def test_keys_are_the_fact_not_the_wording_or_the_question() -> None:
    answers = [[f["answer"], "Właściwa odpowiedź to: " + f["answer"]] for f in FACTS]
    template = template_words(answers)
    assert {"właściwa", "odpowiedź"} <= template
    keys = answer_keys("Na jakim porcie słucha panel administracyjny?", answers[1], template)
    assert keys == ["7443"]
    assert answer_keys("Jak nazywa się wydanie 4.2?", answers[7], template) == ["orzeł"]
    assert answer_keys("Reverse: apple fish red dog", ["dog red fish apple"]) == []  # nothing to check
    assert answer_keys("Q?", ["x"], explicit=["Borsuk"]) == ["borsuk"]


def test_sign_test_exact_values() -> None:
    assert sign_test(5, 0) == pytest.approx(1 / 32)
    assert sign_test(0, 0) == 1.0
    assert sign_test(6, 1) == pytest.approx(8 / 128)
    assert sign_test(3, 3) == pytest.approx(42 / 64)


def test_status_says_insufficient_evidence_and_how_many_more_lessons(capsys: pytest.CaptureFixture[str]) -> None:
    from academyd.commands.status import render
    from academyd.status import last_verdict

    few = checks(n_facts=5)
    v = decide(measurement({c["index"]: KNOWS[c["index"]] for c in few}, BASE, few), ARENA)

    class Versions:  # the store's list_versions, as the registry records a verdict
        def list_versions(self) -> list[dict[str, Any]]:
            return [{"version": "v1", "verdict": v.to_event()}]

    lv = last_verdict(Versions())
    assert lv is not None and lv["insufficient_evidence"] is True and lv["verdict"] == "reject"
    render({"last_verdict": lv, "now": "2026-12-06T10:00:00+00:00"})
    out = " ".join(capsys.readouterr().out.split())
    assert "insufficient evidence" in out and f"about {lv['evidence']['lessons_needed']} more lessons" in out
