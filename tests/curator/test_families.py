"""The held-out split by family: the twin case (one question, two answer wordings), decontamination, checks."""

from __future__ import annotations

import json
from pathlib import Path

from academyd.arena.answers import is_right
from academyd.curator.build import build_dataset
from academyd.curator.dedup import jaccard, normalize, shingle_set
from academyd.settings import load_settings
from academyd.store import Store
from fixtures.curator import T0, CorpusStore
from fixtures.polish import FACTS, polish_lessons


def _questions(path: str) -> list[str]:
    return [json.loads(line)["input"] for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _store(tmp_path: Path) -> tuple[object, Store, dict[str, dict[str, object]]]:
    settings = load_settings(None, data_dir=tmp_path / "data")  # defaults: alpaca, 10 % held out
    store = Store.open(settings.db_path)
    c = CorpusStore(store)
    by_key = {}
    for les in polish_lessons():
        by_key[c.lesson(les["situation"], les["action"], les["result"], lesson_id=les["id"])] = les
    return settings, store, by_key


def test_twins_never_straddle_the_split_and_moves_are_reported(tmp_path: Path) -> None:
    settings, store, by_key = _store(tmp_path)
    # An earlier dataset split these lessons per lesson (the old rule): remember a split that put one twin
    # of some questions in training and the other in the held-out set.
    twins: dict[tuple[int, int], list[str]] = {}
    for key, les in by_key.items():
        twins.setdefault((les["fact"], les["question"]), []).append(key)
    old = [(a, "train", "ds-old") for a, _ in list(twins.values())[:5]]
    old += [(b, "heldout", "ds-old") for _, b in list(twins.values())[:5]]
    with store.transaction():
        store.add_dataset_members(old)

    r = build_dataset(settings, store, now=T0)
    assert r.ok, r.refused
    manifest = json.loads(Path(r.manifest_path).read_text())
    train_q, held_q = _questions(r.path), _questions(r.heldout_path)

    # asserted over the files: no held-out question stands in training, nor anything near it
    assert held_q and not set(held_q) & set(train_q)
    for h in held_q:
        sh = shingle_set(normalize(h), 5)
        assert max(jaccard(sh, shingle_set(normalize(t), 5)) for t in train_q) < settings.curator.decontamination_threshold
    # twins on one side: both wordings of every held-out question are held out
    assert all(held_q.count(q) == 2 for q in set(held_q))
    fam = manifest["families"]
    assert fam["crossing"] == 0 and fam["heldout"] >= settings.arena.min_heldout_families
    assert fam["moved"] == 5 and {m["from"] for m in fam["moves"]} == {"heldout"}  # the 5 old held-out twins
    # answers are the chat turn Venom gives: no result marker, the system prompt Venom sends
    train_rows = [json.loads(x) for x in Path(r.path).read_text(encoding="utf-8").splitlines()]
    assert all("Result:" not in x["output"] and "Sukces" not in x["output"] for x in train_rows)
    assert {x["instruction"] for x in train_rows} == {settings.curator.system_prompt}

    # the checks file: each checkable held-out question, its keys the fact (not the wording)
    checks = [json.loads(x) for x in Path(manifest["files"]["checks"]).read_text(encoding="utf-8").splitlines()]
    assert len(checks) == len(held_q) and manifest["families"]["heldout_checkable"] == fam["heldout"]
    for c in checks:
        fact = next(f for f in FACTS if c["question"] in f["questions"])
        assert is_right(fact["answer"], c["keys"]), c
        assert not is_right("Właściwa odpowiedź to: nie wiem.", c["keys"]), c
        others = [f for f in FACTS if f is not fact]
        assert not any(is_right(f["answer"], c["keys"]) for f in others), c
    store.close()


def test_a_second_build_keeps_families_whole(tmp_path: Path) -> None:
    settings, store, by_key = _store(tmp_path)
    first = build_dataset(settings, store, now=T0)
    held_before = set(_questions(first.heldout_path))
    c = CorpusStore(store, prefix="b2-")
    for q in sorted(held_before):  # a third wording of every held-out question arrives later
        c.lesson(q, "Na pewno: " + q, "Sukces ✅")
    again = build_dataset(settings, store, now=T0.replace(hour=13))
    held_after, train_after = _questions(again.heldout_path), _questions(again.path)
    assert held_before <= set(held_after) and not set(held_after) & set(train_after)
    store.close()


def test_no_held_out_restatement_reaches_training(tmp_path: Path) -> None:
    """With augmentation on, every held-out family is grepped for in the training file: none of its questions
    (nor anything near them) is there, restated or not."""
    settings, store, _ = _store(tmp_path)
    settings.curator.augment = True
    r = build_dataset(settings, store, now=T0)
    manifest = json.loads(Path(r.manifest_path).read_text())
    aug = manifest["augmentation"]
    assert aug["restatements"] > 100, aug
    train_text = Path(r.path).read_text(encoding="utf-8").casefold()
    train_q = _questions(r.path)
    held_q = set(_questions(r.heldout_path))
    assert len(train_q) > 120  # the restatements are there
    for h in held_q:
        assert json.dumps(h, ensure_ascii=False)[1:-1].casefold() not in train_text, h
        sh = shingle_set(normalize(h), 5)
        assert max(jaccard(sh, shingle_set(normalize(t), 5)) for t in train_q) < settings.curator.decontamination_threshold
    store.close()
