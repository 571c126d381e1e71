"""Validation families (#21, deliverable 2): lessons set aside for the trainer to keep its best step on.

Whole lesson families, out of training (restatements included) and out of the gate's held-out set, with
answer keys the gate's rule scores; the daemon's training spec carries them. Too few lesson families: none,
and the manifest says why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from academyd.arena.answers import is_right
from academyd.curator.build import build_dataset
from academyd.curator.dedup import jaccard, normalize, shingle_set
from academyd.curator.validation import read_validation
from academyd.settings import load_settings
from academyd.store import Store
from academyd.trainer.spec import TrainSpec
from fixtures.curator import T0, CorpusStore
from fixtures.polish import FACTS, polish_lessons


def _build(tmp_path: Path, lessons: list[dict[str, Any]], **curator: Any) -> tuple[Any, Any, Store]:
    settings = load_settings(None, data_dir=tmp_path / "data")
    settings = settings.model_copy(update={"curator": settings.curator.model_copy(update=curator)})
    store = Store.open(settings.db_path)
    c = CorpusStore(store)
    for les in lessons:
        c.lesson(les["situation"], les["action"], les["result"], lesson_id=les["id"])
    return settings, build_dataset(settings, store, now=T0), store


def _questions(path: str) -> list[str]:
    return [json.loads(line)["input"] for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_validation_families_are_out_of_training_and_out_of_the_heldout_set(tmp_path: Path) -> None:
    settings, r, store = _build(tmp_path, polish_lessons(), validation_families=4, validation_questions=3,
                                augment=True)
    assert r.ok, r.refused
    manifest = json.loads(Path(r.manifest_path).read_text())
    stats = manifest["validation"]
    # A family here is one question taught with two answer wordings: 4 families, 8 lessons out of training,
    # each question asked once, 3 at most.
    assert (stats["families"], stats["questions"], stats["examples_set_aside"]) == (4, 3, 8), stats
    rows = read_validation(r.heldout_path)
    assert Path(manifest["files"]["validation"]).is_file() and len(rows) == 3
    asked = [v["example"]["input"] for v in rows]
    assert len(set(asked)) == 3 and len({v["family"] for v in rows}) == 3
    train_q, held_q = _questions(r.path), _questions(r.heldout_path)
    assert manifest["augmentation"]["restatements"] > 0  # restatements were written, of other lessons
    # No validation question in training or in the held-out set, and none near a training question
    # (restatements included), at the curator's decontamination threshold.
    assert not set(asked) & set(train_q) and not set(asked) & set(held_q)
    for q in asked:
        sh = shingle_set(normalize(q), settings.curator.shingle_chars)
        assert max(jaccard(sh, shingle_set(normalize(t), settings.curator.shingle_chars)) for t in train_q) \
            < settings.curator.decontamination_threshold, q
    # The families are whole: every lesson of a validation family is out of training.
    decisions = [json.loads(x) for x in Path(r.decisions_path).read_text(encoding="utf-8").splitlines()]
    assert sum(d["decision"] == "validation" for d in decisions) == 8
    assert {v["record"] for v in rows} <= {d["record"] for d in decisions if d["decision"] == "validation"}
    # Keys name the fact, as the gate scores: the right fact's answer is right, the others' are not.
    for v in rows:
        fact = next(f for f in FACTS if v["example"]["input"] in f["questions"])
        assert is_right(fact["answer"], v["keys"]), v
        assert not any(is_right(f["answer"], v["keys"]) for f in FACTS if f is not fact), v
    # The training spec the daemon writes carries them, as the trainer reads them.
    spec = TrainSpec.from_dict({"base_model": "/m", "dataset_path": r.path, "heldout_path": r.heldout_path,
                                "output_dir": "/runs/x", "validation": rows})
    assert [v["keys"] for v in spec.validation] == [v["keys"] for v in rows]
    store.close()


def test_off_by_default_and_none_when_the_dataset_is_too_small(tmp_path: Path) -> None:
    settings, r, store = _build(tmp_path / "default", polish_lessons())
    assert r.ok and read_validation(r.heldout_path) == []
    assert json.loads(Path(r.manifest_path).read_text())["validation"]["families"] == 0
    store.close()
    # Six lessons (three questions, two wordings each): too few families to set one aside and still teach.
    small = [les for les in polish_lessons() if les["fact"] == 0][:6]
    settings, r, store = _build(tmp_path / "small", small, validation_families=2, min_examples=1, augment=False)
    assert r.ok, r.refused
    stats = json.loads(Path(r.manifest_path).read_text())["validation"]
    assert stats["families"] == 0 and "too small" in stats["reason"], stats
    assert read_validation(r.heldout_path) == [] and len(_questions(r.path)) + len(_questions(r.heldout_path)) == 6
    store.close()
