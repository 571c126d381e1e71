"""Hashing for the held-out split and the replay sample.

`unit_hash` maps a text to [0, 1): the held-out split compares a family's hash with the held-out fraction
(academyd.curator.families, where the split itself and its remembered records live), and `replay_sample`
takes the lowest salted hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def unit_hash(text: str, salt: str = "") -> float:
    digest = hashlib.sha256(f"{salt}{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def replay_sample(candidates: Iterable[str], k: int, seed: str) -> list[str]:
    """A deterministic sample of k earlier training keys (lowest salted hash)."""
    return sorted(candidates, key=lambda key: unit_hash(key, seed))[: max(0, k)]
