"""The real loop's test facts (tests/fixtures/lab_facts.py) ask in new words: no held-out question is near a
lesson, nor near any template restatement the curator's augmentation writes of one, at the curator's own
decontamination threshold (exact Jaccard of character shingles, academyd.curator.dedup)."""

from __future__ import annotations

from academyd.arena.answers import is_right
from academyd.curator.augment import language, restate
from academyd.curator.dedup import jaccard, normalize, shingle_set
from academyd.settings import load_settings
from fixtures.lab_facts import FACTS, answered, heldout_questions, keys_of, lab_lessons


def test_twelve_facts_ten_lessons_two_heldout_each_a_third_polish() -> None:
    lessons, held = lab_lessons(), heldout_questions()
    assert len(FACTS) == 12 and len(lessons) == 120 and len(held) == 24
    assert len({l["situation"] for l in lessons}) == 120
    polish = sum(language(l["situation"]) == "pl" for l in lessons)
    assert 30 <= polish <= 60, polish
    assert all(len(set(f["answers"])) >= 2 for f in FACTS)
    assert sum(language(q) == "pl" for q in held) >= 8
    # every lesson names its key, and every answer wording contains it (the gate's checks score by the key)
    for lesson in lessons:
        key = lesson["metadata"]["answer_key"]
        assert is_right(lesson["action"], [key]), lesson
    assert all(keys_of(q) for q in held)
    assert not answered(held[0], "I don't know the name of the network.")


def test_no_heldout_question_is_near_a_lesson_or_a_restatement() -> None:
    cfg = load_settings(None).curator
    k, threshold = cfg.shingle_chars, cfg.decontamination_threshold
    prompts = [l["situation"] for l in lab_lessons()]
    for lesson in lab_lessons():
        prompts += [r.prompt for r in restate(lesson["situation"], lesson["action"], family="f",
                                              seed=lesson["lesson_id"], per_kind=max(cfg.augment_per_kind, 4))]
    shingles = [shingle_set(normalize(p), k) for p in prompts]
    worst = []
    for q in heldout_questions():
        sq = shingle_set(normalize(q), k)
        sim, near = max((jaccard(sq, s), p) for s, p in zip(shingles, prompts, strict=True))
        worst.append((sim, q, near))
    assert max(worst)[0] < threshold, max(worst)
    assert max(worst)[0] < 0.5, max(worst)  # well below it: new words, not a swapped frame
