"""Deduplication: exact (normalized hash) and near (MinHash LSH over character shingles).

Greedy and order-stable: examples are visited in store order and each is compared only with examples
already kept, so appending records never changes an earlier decision (and an example held out once is
never displaced by a later near-copy). LSH proposes candidates; the decision is the exact Jaccard
similarity of the two shingle sets, so the threshold means what it says.

Signatures are rensa's RMinHash (Rust) over the 64-bit hash of every k-character shingle, computed for a
whole batch from one flat buffer. Banding is vectorized: a band's rows hashed to one 64-bit key per
example, and only examples that share a band key with another one are visited one by one (a key
collision between different bands is only an extra candidate: the exact check decides).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import rensa

from academyd.curator.rules import squash

_MAX32 = np.uint64((1 << 32) - 1)
_SIGN_CHUNK = 4096  # texts per signing chunk: ~2.5 M shingles, arrays that stay near the caches


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
    """A mixed 64-bit hash of every window of k code points: the polynomial sum(cp[i+j] * P^(k-1-j)),
    built by doubling (windows of 1, 2, 4, ... then the rest), in place, then mixed."""
    prime = np.uint64(0x100000001B3)
    with np.errstate(over="ignore"):
        h, width, power = cp.copy(), 1, prime  # h[i]: the window of `width` starting at i; power = P^width
        while width * 2 <= k:
            n = len(cp) - 2 * width + 1
            h = h[:n] * power + h[width : width + n]
            width, power = width * 2, power * power
        for j in range(width, k):  # the remaining code points one at a time
            n = len(cp) - j
            h = h[:n] * prime + cp[j : j + n]
        h = h[: len(cp) - k + 1]
        tmp = np.right_shift(h, np.uint64(29))
        np.bitwise_xor(h, tmp, out=h)
        np.multiply(h, np.uint64(0xBF58476D1CE4E5B9), out=h)
        np.right_shift(h, np.uint64(32), out=tmp)
        np.bitwise_xor(h, tmp, out=h)
    return h


def batch_window_hashes(norms: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The 64-bit shingle hashes of many texts in one vectorized pass: (all, in order; count per text).
    The low 32 bits of each are `shingle_hashes`."""
    padded = [t.replace("\x00", " ").ljust(k) for t in norms]
    cp = np.frombuffer("\x00".join(padded).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    h = _window_hashes(cp, k)
    # a window is inside one text unless it starts in the k places up to a separator
    lengths = np.fromiter((len(t) - k + 1 for t in padded), dtype=np.int64, count=len(padded))
    ends = np.cumsum(np.fromiter((len(t) + 1 for t in padded), dtype=np.int64, count=len(padded)))[:-1] - 1
    keep = np.ones(len(h), dtype=bool)
    bad = (ends[:, None] - np.arange(k, dtype=np.int64)[None, :]).ravel()
    keep[bad[(bad >= 0) & (bad < len(h))]] = False
    return h[keep], lengths


def batch_shingle_hashes(norms: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """`shingle_hashes` of many texts in one vectorized pass: (all hashes in order, count per text)."""
    flat, lengths = batch_window_hashes(norms, k)
    return flat & _MAX32, lengths


def shingle_set(norm: str, k: int) -> set[int]:
    return set(shingle_hashes(norm, k).tolist())


def jaccard(a: set[int], b: set[int]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class Signer:
    """MinHash signatures (rensa's RMinHash) for batches of normalized texts."""

    def __init__(self, num_perm: int, k: int, seed: int = 1) -> None:
        self.num_perm, self.k, self.seed = num_perm, k, seed

    def sign(self, norms: list[str], workers: int = 2) -> np.ndarray:
        """One signature row per text (texts already normalized), in chunks on `workers` threads (numpy
        and rensa do the work outside the GIL: two cores sign about twice as fast)."""
        out = np.empty((len(norms), self.num_perm), dtype=np.uint32)

        def chunk(lo: int) -> None:
            flat, lengths = batch_window_hashes(norms[lo : lo + _SIGN_CHUNK], self.k)
            offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.uint64)
            matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, self.num_perm, self.seed)
            out[lo : lo + len(lengths)] = np.asarray(matrix.to_rows(), dtype=np.uint32)

        starts = range(0, len(norms), _SIGN_CHUNK)
        if workers <= 1 or len(starts) <= 1:
            for lo in starts:
                chunk(lo)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(chunk, starts))
        return out


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


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(examples x bands) 64-bit keys: equal band rows give equal keys (and different bands rarely do)."""
    keys = np.empty((len(sigs), bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            h = np.full(len(sigs), np.uint64(0x9E3779B97F4A7C15) * np.uint64(b + 1), dtype=np.uint64)
            for c in sigs[:, b * rows : (b + 1) * rows].T.astype(np.uint64):
                h = (h ^ c) * np.uint64(0x100000001B3)
                h ^= h >> np.uint64(31)
            keys[:, b] = h
    return keys


class Deduper:
    """Feed examples in a stable order; each is kept or named a duplicate of an earlier kept one."""

    def __init__(self, *, threshold: float, num_perm: int, k: int) -> None:
        self.threshold, self.k = threshold, k
        self.signer = Signer(num_perm, k)
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.exact: dict[bytes, str] = {}
        self.candidates_checked = 0
        # kept examples: key, normalized text, signature, band keys (row i of each array)
        self._kept_keys: list[str] = []
        self._kept_norms: list[str] = []
        self._kept_sigs = np.empty((0, num_perm), dtype=np.uint32)
        self._kept_bands = np.empty((0, self.bands), dtype=np.uint64)

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
        bands = band_keys(sigs, self.bands, self.rows)
        old = len(self._kept_keys)
        # Which examples share a band key with any other (kept before, or in this batch)? Only those
        # can be near-duplicates or have one; the rest are kept without a look.
        shared = np.zeros(len(fresh), dtype=bool)
        old_shared = np.zeros(old, dtype=bool)
        for b in range(self.bands):
            column = np.concatenate((self._kept_bands[:, b], bands[:, b]))
            _, inverse, counts = np.unique(column, return_inverse=True, return_counts=True)
            hit = counts[inverse] > 1
            old_shared |= hit[:old]
            shared |= hit[old:]
        index: dict[tuple[int, int], list[int]] = {}  # (band, key) -> kept rows (old and new)
        for row in np.flatnonzero(old_shared).tolist():
            for b, key in enumerate(self._kept_bands[row].tolist()):
                index.setdefault((b, key), []).append(row)
        cache: dict[int, set[int]] = {}
        new_norms: list[str] = []
        new_rows: list[int] = []  # positions in `fresh` of the examples kept now

        def shingles(row: int) -> set[int]:
            s = cache.get(row)
            if s is None:
                norm = self._kept_norms[row] if row < old else new_norms[row - old]
                s = cache[row] = shingle_set(norm, self.k)
            return s

        for pos, i in enumerate(fresh):
            if not shared[pos]:
                verdicts[i] = Verdict(True)
                new_rows.append(pos)
                new_norms.append(norms[i])
                continue
            own = bands[pos].tolist()
            candidates = {r for b, key in enumerate(own) for r in index.get((b, key), ())}
            best: tuple[float, int] | None = None
            mine: set[int] | None = None
            for r in sorted(candidates):
                other_sig = self._kept_sigs[r] if r < old else sigs[new_rows[r - old]]
                # The signature estimate screens candidates (standard error <= 0.0625 at 64 permutations;
                # 0.2 below the threshold is > 3 of them); survivors get the exact Jaccard similarity.
                if float(np.mean(sigs[pos] == other_sig)) < self.threshold - 0.2:
                    continue
                self.candidates_checked += 1
                if mine is None:
                    mine = shingle_set(norms[i], self.k)
                sim = jaccard(mine, shingles(r))
                if sim >= self.threshold and (best is None or sim > best[0]):
                    best = (sim, r)
            if best is not None:
                r = best[1]
                first = self._kept_keys[r] if r < old else keys[fresh[new_rows[r - old]]]
                verdicts[i] = Verdict(False, "near_duplicate", first, round(best[0], 4))
                continue
            verdicts[i] = Verdict(True)
            row = old + len(new_rows)
            new_rows.append(pos)
            new_norms.append(norms[i])
            if mine is not None:
                cache[row] = mine
            for b, key in enumerate(own):
                index.setdefault((b, key), []).append(row)
        self._kept_keys.extend(keys[fresh[p]] for p in new_rows)
        self._kept_norms.extend(new_norms)
        self._kept_sigs = np.concatenate((self._kept_sigs, sigs[new_rows]))
        self._kept_bands = np.concatenate((self._kept_bands, bands[new_rows]))
        return [v for v in verdicts if v is not None]
