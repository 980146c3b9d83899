"""A pseudo-random permutation of [0, n) evaluated at any index without materialising it: the loader's
epoch order for a corpus with more windows than it keeps as an explicit array (memory O(1), not O(n)).

A balanced Feistel network over the smallest even number of bits that covers n, its round function
splitmix64's finaliser keyed per round, and cycle-walking (an index that lands at or beyond n goes
through the network again) so that the permutation of [0, 2**bits) restricted to [0, n) is one of
[0, n). The domain is under 4n, so an index takes under 4 passes on average."""
from __future__ import annotations

import numpy as np

ROUNDS = 6  # Luby-Rackoff: 4 already make a pseudo-random permutation of a keyed random function
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (a bijective 64-bit hash; uint64 products wrap, as intended)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


class IndexPermutation:
    """perm[idx] for integer arrays idx in [0, n), like indexing rng.permutation(n) (a different order)."""

    def __init__(self, n: int, rng: np.random.Generator):
        bits = max(2, int(n - 1).bit_length())
        bits += bits & 1
        self.n, self.half, self.mask = n, np.uint64(bits // 2), np.uint64((1 << (bits // 2)) - 1)
        self.keys = rng.integers(0, 2**63, size=ROUNDS, dtype=np.uint64)

    def __len__(self) -> int:
        return self.n

    def _network(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << self.half) | right

    def __getitem__(self, idx) -> np.ndarray:
        out = self._network(np.asarray(idx, dtype=np.uint64))
        todo = np.flatnonzero(out >= self.n)
        while len(todo):
            out[todo] = self._network(out[todo])
            todo = todo[out[todo] >= self.n]
        return out.astype(np.int64)
