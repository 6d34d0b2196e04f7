"""Multi-bin batching: K bins by length with equal-mass boundaries (empirical quantiles of
recent completions, re-estimated every `refresh` completions), as in seed 002 / the multi-bin
batching paper. Bin 0 holds the shortest requests. Before enough history the boundaries are
seed 002's 64·4^i tokens (64, 256, 1024 for K = 4).
"""
from __future__ import annotations

from bisect import bisect_left
from collections import deque


class BinBoundaries:
    def __init__(self, num_bins: int, history: int = 512, refresh: int = 200) -> None:
        self.num_bins, self.refresh = num_bins, refresh
        self.boundaries: list[int] = [64 * 4 ** i for i in range(num_bins - 1)]
        self._recent: deque[int] = deque(maxlen=history)
        self._since = 0
        self.version = 0

    def bin_of(self, length: int) -> int:
        """Bin k holds lengths in (boundaries[k-1], boundaries[k]]."""
        return bisect_left(self.boundaries, length)

    def observe(self, length: int) -> None:
        if self.num_bins == 1:
            return
        self._recent.append(length)
        self._since += 1
        if self._since >= self.refresh and len(self._recent) >= self.num_bins:
            self.boundaries = equal_mass(list(self._recent), self.num_bins)
            self._since = 0
            self.version += 1


def equal_mass(values: list[int], k: int) -> list[int]:
    """K−1 boundaries putting about the same number of `values` in each bin."""
    s = sorted(values)
    return [s[max(0, (len(s) * i) // k - 1)] for i in range(1, k)]
