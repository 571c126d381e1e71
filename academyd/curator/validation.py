"""Validation families: lessons set aside from training for the trainer to keep its best step on (#21).

The trainer answers these questions at every KL measurement and keeps the step with the most right answers
inside its KL budget (academyd.trainer.loop.KLWatch). So they must be questions it never trains on, and not
the gate's held-out questions (the gate would then judge on what chose the adapter):

- only lesson families on the training side, decided by hash in this build (never trained on in an earlier
  build, never held out), whose answer has keys (academyd.arena.answers.answer_keys, as the checks file);
- at most a quarter of those families (the rest teach), and `curator.validation_families` at most, the lowest
  salted family hashes first (the same families stay set aside as the store grows); each distinct question
  once, one per family first, `curator.validation_questions` at most;
- none with a question near a training question (`curator.decontamination_threshold`, as the held-out set),
  and template or model restatements near a validation question are dropped from training (`drop_near`).

Validation examples are neither trained on nor recorded as split members: a family set aside today is fresh
tomorrow, and is set aside again while it is among the lowest hashes, or trained on once the setting is off.
The file beside the dataset, `validation_<tag>.jsonl`, has one line per question: `{"example": the line in
the dataset's format, "keys", "family", "record"}`; the daemon puts it into the training spec
(`TrainSpec.validation`, read by `read_validation`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from academyd.curator.checks import checks_of
from academyd.curator.dedup import Deduper, jaccard, normalize, shingle_set
from academyd.curator.examples import Example
from academyd.curator.split import unit_hash

SALT = "validation:"
# A validation family for every FAMILIES_PER_VALIDATION fresh lesson families at least: the rest teach.
FAMILIES_PER_VALIDATION = 4
# The trainer answers every question at every KL measurement, and takes at most this many (its spec's limit).
MAX_QUESTIONS = 16


def set_aside(train: list[Example], lessons: list[Example], family: dict[str, str], why: dict[str, str], *,
              fmt: str, families: int, questions: int, threshold: float, num_perm: int, k: int
              ) -> tuple[list[dict[str, Any]], set[str], dict[str, Any]]:
    """(validation lines, keys of the examples taken out of training, stats for the manifest).

    `train`: the training side of the split (no replay); `lessons`: every lesson example of the build (their
    answers give the keys, as for the checks file); `why`: the split's rule per example."""
    stats: dict[str, Any] = {"families_wanted": families, "families": 0, "questions": 0}
    if families <= 0:
        stats["reason"] = "off (curator.validation_families is 0)"
        return [], set(), stats
    members: dict[str, list[Example]] = defaultdict(list)
    for ex in train:
        members[family[ex.key]].append(ex)
    fresh = sorted((fid for fid, exs in members.items()
                    if all(ex.source == "lesson" and why.get(ex.key) == "hash" for ex in exs)),
                   key=lambda fid: unit_hash(fid, SALT))
    checkable = {c["family"] for c in checks_of([ex for fid in fresh for ex in members[fid]], lessons, family)}
    fresh = [fid for fid in fresh if fid in checkable]
    allowed = min(families, len(fresh) // FAMILIES_PER_VALIDATION)
    stats["fresh_checkable_families"] = len(fresh)
    if allowed == 0:
        stats["reason"] = (f"the dataset is too small: {len(fresh)} new lesson families with a checkable answer, "
                           f"a validation family needs {FAMILIES_PER_VALIDATION} (the rest teach); the trainer "
                           "keeps the last step inside its KL budget")
        return [], set(), stats
    near = _near_training(fresh, members, train, family, threshold=threshold, num_perm=num_perm, k=k)
    chosen = [fid for fid in fresh if fid not in near][:allowed]
    taken = {ex.key for fid in chosen for ex in members[fid]}
    examples = [ex for fid in chosen for ex in members[fid]]
    # The keys of a validation question come from its own family's answers (the same rule as the checks file).
    rows = checks_of(examples, lessons, family)
    by_family: dict[str, list[dict[str, Any]]] = defaultdict(list)
    asked: set[str] = set()
    for r in rows:  # one question once: a lesson taught with two answer wordings is asked one time
        ex = examples[r["index"]]
        if normalize(ex.prompt()) not in asked:
            asked.add(normalize(ex.prompt()))
            by_family[r["family"]].append({"example": ex.render(fmt), "keys": r["keys"], "family": r["family"],
                                           "record": r["record"]})
    picked: list[dict[str, Any]] = []
    limit = min(questions, MAX_QUESTIONS)
    for depth in range(max((len(v) for v in by_family.values()), default=0)):  # one per family first
        for fid in chosen:
            if depth < len(by_family[fid]) and len(picked) < limit:
                picked.append(by_family[fid][depth])
    stats.update(families=len(chosen), questions=len(picked), examples_set_aside=len(taken),
                 near_training=len(near))
    return picked, taken, stats


def _near_training(fids: list[str], members: dict[str, list[Example]], train: list[Example],
                   family: dict[str, str], *, threshold: float, num_perm: int, k: int) -> set[str]:
    """Candidate families with a question near a training question of another family."""
    if not fids:
        return set()
    cand = [ex for fid in fids for ex in members[fid]]
    cand_keys = {ex.key for ex in cand}
    others = [ex for ex in train if ex.key not in cand_keys]
    if not others:
        return set()
    dedup = Deduper(threshold=threshold, num_perm=num_perm, k=k)
    dedup.run([e.key for e in others], [e.prompt() for e in others])
    other_keys = {e.key for e in others}
    return {family[ex.key] for ex, v in zip(cand, dedup.run([e.key for e in cand], [e.prompt() for e in cand]),
                                            strict=True) if v.duplicate_of in other_keys}


def drop_near(made: list[Example], validation: list[Example], *, threshold: float, k: int) -> tuple[list[Example], int]:
    """Restatements (augmentation) whose question is near a validation question are not trained on."""
    if not made or not validation:
        return made, 0
    held = [shingle_set(normalize(e.prompt()), k) for e in validation]
    keep = [e for e in made if not any(jaccard(shingle_set(normalize(e.prompt()), k), h) >= threshold for h in held)]
    return keep, len(made) - len(keep)


def validation_file(heldout_path: str | Path) -> Path | None:
    """`validation_<tag>.jsonl` beside `heldout_<tag>.jsonl`, or None when the name is not the curator's."""
    p = Path(heldout_path)
    if not p.name.startswith("heldout_"):
        return None
    return p.with_name("validation_" + p.name[len("heldout_"):])


def read_validation(heldout_path: str | Path | None) -> list[dict[str, Any]]:
    """The validation questions of a dataset (by its held-out file's name); [] when it has none."""
    path = validation_file(heldout_path) if heldout_path else None
    if path is None or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
