"""The global document order: a pure function of (config, position), so a resumed run continues exactly."""

import fractions
import functools
import math
from collections.abc import Sequence

import numpy as np
from grain.experimental import index_shuffle

PERMUTATION_MAX_DOCS = 1 << 22  # larger sources shuffle without holding a permutation (slower per document)


def proportions(weights: Sequence[float]) -> list[int]:
    """Mixture weights as the smallest integer proportions (0.7, 0.3 -> 7, 3)."""
    fracs = [fractions.Fraction(w).limit_denominator(1000) for w in weights]
    den = math.lcm(*(f.denominator for f in fracs))
    ints = [int(f * den) for f in fracs]
    ints = [i // math.gcd(*ints) for i in ints]
    if sum(ints) > 10**6:
        raise ValueError(f"mixture weights {list(weights)} need a period of {sum(ints)} draws: use simpler ratios")
    return ints


class Order:
    """The global document order: position g -> (source, document), a pure function of the config and g.

    Sources are drawn by a smooth weighted round robin over their integer proportions; the k-th draw from source s is
    document permutation(k mod n_s) of epoch k // n_s, seeded by (seed_s + epoch) as grain's `shuffle` + `repeat`
    reseed: every epoch of every source is a fresh permutation, and no epoch counter needs storing."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int, shuffle: bool):
        props = proportions(weights)
        slots = sorted(((k + 0.5) / w, i, k) for i, w in enumerate(props) for k in range(w))
        self.slot_source = np.array([i for _, i, _ in slots], np.int64)
        self.slot_rank = np.array([k for _, _, k in slots], np.int64)
        self.props, self.sizes = np.array(props, np.int64), np.array(sizes, np.int64)
        self.seeds = [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(len(sizes))]
        self.shuffle = shuffle

    def __call__(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cycle, r = np.divmod(g, len(self.slot_source))
        src = self.slot_source[r]
        epoch, pos = np.divmod(cycle * self.props[src] + self.slot_rank[r], self.sizes[src])
        if self.shuffle:
            pos = pos.copy()
            for s, e in {(int(s), int(e)) for s, e in zip(src, epoch)}:
                m = (src == s) & (epoch == e)
                pos[m] = shuffle(pos[m], int(self.sizes[s]), (self.seeds[s] + e) % 2**32)
        return src, pos


@functools.lru_cache(maxsize=4)
def permutation(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n).astype(np.int32 if n < 2**31 else np.int64)


def shuffle(pos: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Position -> document under the permutation of [0, n) that `seed` names: a cached numpy permutation (fast)
    for sources up to PERMUTATION_MAX_DOCS documents, grain's index_shuffle (O(1) memory) above."""
    if n == 1:
        return np.zeros_like(pos)
    if n <= PERMUTATION_MAX_DOCS:
        return permutation(n, seed)[pos]
    return np.array([index_shuffle(int(p), max_index=n - 1, seed=seed, rounds=4) for p in pos], np.int64)
