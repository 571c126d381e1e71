"""Families: the unit of the held-out split, and the decontamination pass between the two files.

A family is every example that teaches the same thing, decided before any file is written:
- the same question (the human turns, normalized), whatever the answer's wording: the twins of a lesson
  taught twice with two wordings are one family;
- questions near each other (Jaccard of character shingles of the prompt alone >= `curator.family_threshold`,
  MinHash LSH proposes, the exact similarity decides);
- examples that say they belong together (`Example.family`: one lesson's restatements).
A family is held out or trained on whole. Splitting per example (as before) put a question in training
with one answer wording and in the held-out set with the other, so held-out loss measured memory.

The split of a new family is the hash of its first question (the fraction per source, as before); a family
that holds a record once trained on is trained on (its earlier held-out records are moved, and counted);
one that holds a record once held out stays held out. Each source holds out at least
`min(min_families, a quarter of its families)` families, so that the gate has enough of them to decide.

Decontamination: every held-out prompt is compared with the training prompts (a second, lower threshold,
`curator.decontamination_threshold`); one that crosses goes to training with its whole family.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field

from academyd.curator.dedup import Deduper
from academyd.curator.examples import Example
from academyd.curator.rules import squash
from academyd.curator.split import unit_hash


class _Union:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def join(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def family_of(examples: list[Example], *, threshold: float, num_perm: int, k: int) -> dict[str, str]:
    """{example key: family id}. `examples` in store order; a family's id is the hash of its first question."""
    uf = _Union()
    for ex in examples:
        uf.find(ex.key)
    by_prompt: dict[str, str] = {}
    by_tag: dict[str, str] = {}
    for ex in examples:
        norm = squash(ex.prompt())
        if norm in by_prompt:
            uf.join(ex.key, by_prompt[norm])
        else:
            by_prompt[norm] = ex.key
        if ex.family:
            if ex.family in by_tag:
                uf.join(ex.key, by_tag[ex.family])
            else:
                by_tag[ex.family] = ex.key
    dedup = Deduper(threshold=threshold, num_perm=num_perm, k=k)
    for ex, verdict in zip(examples, dedup.run([e.key for e in examples], [e.prompt() for e in examples]),
                           strict=True):
        if verdict.duplicate_of:
            uf.join(ex.key, verdict.duplicate_of)
    first: dict[str, Example] = {}
    for ex in examples:  # store order: the first member names the family, stable as the store grows
        first.setdefault(uf.find(ex.key), ex)
    names = {root: "fam-" + hashlib.sha256(f"{ex.source}\0{squash(ex.prompt())}".encode()).hexdigest()[:16]
             for root, ex in first.items()}
    return {ex.key: names[uf.find(ex.key)] for ex in examples}


@dataclass
class FamilySplit:
    split: dict[str, str]  # example key -> "train" | "heldout"
    why: dict[str, str]  # example key -> remembered | hash | family | min_families | decontaminated | ...
    moved: list[dict[str, str]] = field(default_factory=list)  # {record, family, from, to, reason}


def assign_families(examples: list[Example], family: dict[str, str], fraction: float,
                    remembered: dict[str, str], *, min_families: int) -> FamilySplit:
    members: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        members[family[ex.key]].append(ex)
    by_source: dict[str, list[str]] = defaultdict(list)
    for fid, exs in members.items():
        by_source[exs[0].source].append(fid)
    out = FamilySplit({}, {})
    for fids in by_source.values():
        side: dict[str, str] = {}
        why: dict[str, str] = {}
        for fid in fids:
            states = {remembered.get(ex.key) for ex in members[fid]} - {None}
            if "train" in states:
                side[fid], why[fid] = "train", "remembered"
            elif "heldout" in states:
                side[fid], why[fid] = "heldout", "remembered"
            else:
                side[fid], why[fid] = ("heldout" if unit_hash(fid) < fraction else "train"), "hash"
        if fraction > 0:
            want = max(1 if len(fids) * fraction >= 1 else 0, min(min_families, len(fids) // 4))
            have = sum(1 for f in fids if side[f] == "heldout")
            fresh = sorted((f for f in fids if why[f] == "hash" and side[f] == "train"), key=unit_hash)
            for fid in fresh[: max(0, want - have)]:
                side[fid], why[fid] = "heldout", "min_families"
        for fid in fids:
            for ex in members[fid]:
                out.split[ex.key] = side[fid]
                mine = remembered.get(ex.key)
                if mine is not None and mine != side[fid]:
                    out.why[ex.key] = "family"
                    out.moved.append({"record": ex.key, "family": fid, "from": mine, "to": side[fid],
                                      "reason": "its family holds a record trained on before"})
                else:
                    out.why[ex.key] = "remembered" if mine is not None else why[fid]
    return out


def decontaminate(examples: list[Example], family: dict[str, str], result: FamilySplit, *, threshold: float,
                  num_perm: int, k: int) -> int:
    """Move every held-out family with a prompt near a training prompt to training; returns how many examples."""
    train = [ex for ex in examples if result.split[ex.key] == "train"]
    held = [ex for ex in examples if result.split[ex.key] == "heldout"]
    if not train or not held:
        return 0
    dedup = Deduper(threshold=threshold, num_perm=num_perm, k=k)
    dedup.run([e.key for e in train], [e.prompt() for e in train])
    train_keys = {e.key for e in train}
    crossing: dict[str, str] = {}
    for ex, v in zip(held, dedup.run([e.key for e in held], [e.prompt() for e in held]), strict=True):
        if v.duplicate_of in train_keys:
            crossing.setdefault(family[ex.key], v.duplicate_of)
    moved = 0
    for ex in held:
        fid = family[ex.key]
        if fid in crossing:
            result.split[ex.key], result.why[ex.key] = "train", "decontaminated"
            result.moved.append({"record": ex.key, "family": fid, "from": "heldout", "to": "train",
                                 "reason": f"its question is near the training question of {crossing[fid]}"})
            moved += 1
    return moved
