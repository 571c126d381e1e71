"""Deduplication: exact (normalized hash) and near (MinHash LSH over character shingles, datasketch).

Greedy and order-stable: examples are visited in store order and each is compared only with examples
already kept, so appending records never changes an earlier decision (and an example held out once is
never displaced by a later near-copy). LSH proposes candidates; the decision is the exact Jaccard
similarity of the two shingle sets, so the threshold means what it says.

Signatures are computed for many examples at once with numpy, with datasketch's own "affine32" scheme
(its MurmurHash3 pre-mix, then `a*h + b mod 2^32` with its permutations, min over shingles), so they are
the MinHash values datasketch computes for the same shingle hashes (a test holds them equal); the LSH
index is datasketch's MinHashLSH.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH
from datasketch.minhash import _fmix  # noqa: PLC2701 - the scheme's pre-mix, so signatures match datasketch's

from academyd.curator.rules import squash

_MAX32 = np.uint64((1 << 32) - 1)
_SCHEME = "affine32"
_CHUNK = 1 << 16  # shingles per vectorized block (x num_perm uint64s)


def normalize(text: str) -> str:
    return squash(text).replace("\x00", " ")


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(normalize(text).encode(), digest_size=16).digest()


def shingle_hashes(norm: str, k: int) -> np.ndarray:
    """32-bit hashes of every k-character shingle of a normalized text (a text shorter than k: one)."""
    if len(norm) < k:
        norm = norm.ljust(k)
    cp = np.frombuffer(norm.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    return _window_hashes(cp, k) & _MAX32


def _window_hashes(cp: np.ndarray, k: int) -> np.ndarray:
    """A mixed 64-bit hash of every window of k code points (one vectorized pass per position)."""
    n = len(cp) - k + 1
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            h = h * np.uint64(0x100000001B3) + cp[j : j + n]
        h ^= h >> np.uint64(29)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(32)
    return h


def batch_shingle_hashes(norms: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """`shingle_hashes` of many texts in one vectorized pass: (all hashes in order, count per text)."""
    padded = [t.replace("\x00", " ").ljust(k) for t in norms]
    cp = np.frombuffer("\x00".join(padded).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    n = len(cp) - k + 1
    h = _window_hashes(cp, k)
    seps = np.concatenate(([0], np.cumsum(cp == 0)))
    valid = seps[k : k + n] == seps[:n]  # the window holds no separator
    lengths = np.fromiter((len(t) - k + 1 for t in padded), dtype=np.int64, count=len(padded))
    return h[valid] & _MAX32, lengths


def shingle_set(norm: str, k: int) -> set[int]:
    return set(shingle_hashes(norm, k).tolist())


def jaccard(a: set[int], b: set[int]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class Signer:
    """MinHash signatures for batches of normalized texts, vectorized, identical to datasketch's."""

    def __init__(self, num_perm: int, k: int, seed: int = 1) -> None:
        self.num_perm, self.k, self.seed = num_perm, k, seed
        proto = MinHash(num_perm=num_perm, seed=seed, scheme=_SCHEME)
        self.a, self.b = (p.astype(np.uint32) for p in proto.permutations)

    def sign(self, norms: list[str]) -> np.ndarray:
        """One signature row per text (texts already normalized)."""
        out = np.empty((len(norms), self.num_perm), dtype=np.uint32)
        for lo in range(0, len(norms), 2048):
            flat, lengths = batch_shingle_hashes(norms[lo : lo + 2048], self.k)
            flat = _fmix(flat.astype(np.uint32), 32)
            starts = np.concatenate(([0], np.cumsum(lengths)))
            tmp = np.empty_like(flat)
            sig = out[lo : lo + len(lengths)]
            for j in range(self.num_perm):  # permutation-major: contiguous, no (shingles x perms) temporary
                np.multiply(flat, self.a[j], out=tmp)
                tmp += self.b[j]
                sig[:, j] = np.minimum.reduceat(tmp, starts[:-1])
        return out

    def minhash(self, hashvalues: np.ndarray) -> LeanMinHash:
        return LeanMinHash(seed=self.seed, hashvalues=hashvalues, scheme=_SCHEME)


def lsh_params(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows): the most rows per band that still make a pair at exactly the threshold a
    candidate with probability >= `recall` (64 permutations, 0.8: 12 x 5, 0.992). Candidates are
    verified exactly, so a lower precision costs time, never a wrong drop; a lower recall would let
    near-copies through (and across the train/held-out line)."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


@dataclass
class Verdict:
    kept: bool
    reason: str | None = None  # exact_duplicate | near_duplicate
    duplicate_of: str | None = None
    similarity: float | None = None


class Deduper:
    """Feed examples in a stable order; each is kept or named a duplicate of an earlier kept one."""

    def __init__(self, *, threshold: float, num_perm: int, k: int) -> None:
        self.threshold, self.k = threshold, k
        self.signer = Signer(num_perm, k)
        self.lsh = MinHashLSH(num_perm=num_perm, params=lsh_params(threshold, num_perm))
        self.exact: dict[bytes, str] = {}
        self.norms: dict[str, str] = {}
        self.sigs: dict[str, np.ndarray] = {}
        self.candidates_checked = 0

    def run(self, keys: list[str], texts: list[str]) -> list[Verdict]:
        norms = [normalize(t) for t in texts]
        verdicts: list[Verdict | None] = [None] * len(keys)
        fresh: list[int] = []
        for i, (key, norm) in enumerate(zip(keys, norms, strict=True)):
            ek = hashlib.blake2b(norm.encode(), digest_size=16).digest()
            first = self.exact.get(ek)
            if first is not None:
                verdicts[i] = Verdict(False, "exact_duplicate", first, 1.0)
            else:
                self.exact[ek] = key
                fresh.append(i)
        sigs = self.signer.sign([norms[i] for i in fresh])
        cache: dict[str, set[int]] = {}

        def shingles(key: str) -> set[int]:
            s = cache.get(key)
            if s is None:
                s = cache[key] = shingle_set(self.norms[key], self.k)
            return s

        for row, i in enumerate(fresh):
            key = keys[i]
            mh = self.signer.minhash(sigs[row])
            self.norms[key] = norms[i]
            best: tuple[float, str] | None = None
            for other in self.lsh.query(mh):
                # The signature estimate screens candidates (standard error <= 0.0625 at 64 permutations;
                # 0.2 below the threshold is > 3 of them); survivors get the exact Jaccard similarity.
                if float(np.mean(sigs[row] == self.sigs[other])) < self.threshold - 0.2:
                    continue
                self.candidates_checked += 1
                sim = jaccard(shingles(key), shingles(other))
                if sim >= self.threshold and (best is None or sim > best[0]):
                    best = (sim, other)
            if best is not None:
                verdicts[i] = Verdict(False, "near_duplicate", best[1], round(best[0], 4))
                del self.norms[key]
                cache.pop(key, None)
            else:
                self.lsh.insert(key, mh, check_duplication=False)
                self.sigs[key] = sigs[row]
                verdicts[i] = Verdict(True)
        return [v for v in verdicts if v is not None]
