"""The held-out split: by hash of the source record id, remembered so that it never changes.

`is_heldout_by_hash` is the rule (sha256 of the record key, as a fraction of 2^64, below the held-out
fraction); the key starts with the source, so each source is held out at the fraction on its own
(stratified). The store's `dataset_members` table remembers the split each record was first given, and
that wins over the rule: a record once held out stays held out even if the fraction changes later, and a
record once trained on is never moved into the held-out set (which would contaminate evaluations).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def unit_hash(text: str, salt: str = "") -> float:
    digest = hashlib.sha256(f"{salt}{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_heldout_by_hash(key: str, fraction: float) -> bool:
    return unit_hash(key) < fraction


def assign(
    keys_by_source: dict[str, list[str]], fraction: float, remembered: dict[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """(split per key: "train" | "heldout", why: "remembered" | "hash" | "stratify_min_one").

    A source with at least 1/fraction examples and none held out gets its lowest-hash new record held
    out, so every source is represented in evaluations.
    """
    split: dict[str, str] = {}
    why: dict[str, str] = {}
    for source, keys in keys_by_source.items():
        for key in keys:
            if key in remembered:
                split[key], why[key] = remembered[key], "remembered"
            else:
                split[key], why[key] = ("heldout" if is_heldout_by_hash(key, fraction) else "train"), "hash"
        if fraction > 0 and len(keys) * fraction >= 1 and not any(split[k] == "heldout" for k in keys):
            fresh = [k for k in keys if k not in remembered]
            if fresh:
                pick = min(fresh, key=unit_hash)
                split[pick], why[pick] = "heldout", "stratify_min_one"
    return split, why


def replay_sample(candidates: Iterable[str], k: int, seed: str) -> list[str]:
    """A deterministic sample of k earlier training keys (lowest salted hash)."""
    return sorted(candidates, key=lambda key: unit_hash(key, seed))[: max(0, k)]
