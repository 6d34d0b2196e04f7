"""Output-length prediction (pluggable): the KV reservation and the bin of a request.

Default (HistoryPredictor), in order: the client's `expected_output_tokens` hint; else a
quantile (median by default) of recent completions whose prompt fell in the same power-of-two
length bucket; else max_tokens. Always within [1, max_tokens]. The median, not a high quantile:
a reservation covers the whole output while a running sequence holds on average half of it, so
median reservations keep the pool about full with rare preemptions (tests/policy/sim.py: at
20 req/s, q=0.9 waited 2x longer than q=0.5, which preempted 2 of 617).
"""
from __future__ import annotations

from collections import deque
from typing import Protocol


class LengthPredictor(Protocol):
    # Changes whenever predict() may answer differently for the same input (cache key).
    version: int

    def predict(self, prompt_tokens: int, max_tokens: int, hint: int) -> int: ...

    def observe(self, prompt_tokens: int, output_tokens: int) -> None: ...


def bucket(prompt_tokens: int) -> int:
    """Power-of-two prompt-length bucket: 0 for 0, 1 for 1, 2 for 2-3, 3 for 4-7, ..."""
    return max(prompt_tokens, 0).bit_length()


class HistoryPredictor:
    """Quantile of recent output lengths per prompt-length bucket; tables are refreshed every
    `refresh` completions so predictions (and the caches keyed on `version`) stay stable."""

    def __init__(self, quantile: float = 0.5, min_samples: int = 8, history: int = 512,
                 refresh: int = 200) -> None:
        self.quantile, self.min_samples, self.refresh = quantile, min_samples, refresh
        self._history: dict[int, deque[int]] = {}
        self._table: dict[int, int] = {}
        self._since = 0
        self._maxlen = history
        self.version = 0

    def predict(self, prompt_tokens: int, max_tokens: int, hint: int) -> int:
        if hint > 0:
            guess = hint
        else:
            guess = self._table.get(bucket(prompt_tokens), max_tokens)
        return max(1, min(guess, max_tokens))

    def observe(self, prompt_tokens: int, output_tokens: int) -> None:
        b = bucket(prompt_tokens)
        hist = self._history.get(b)
        if hist is None:
            hist = self._history[b] = deque(maxlen=self._maxlen)
        hist.append(max(output_tokens, 0))
        self._since += 1
        # Refresh early for a bucket that just became usable, else every `refresh` completions.
        if self._since >= self.refresh or (len(hist) == self.min_samples and b not in self._table):
            self._rebuild()

    def _rebuild(self) -> None:
        table = {}
        for b, hist in self._history.items():
            if len(hist) >= self.min_samples:
                values = sorted(hist)
                table[b] = values[min(len(values) - 1, int(self.quantile * len(values)))]
        self._since = 0
        if table != self._table:
            self._table = table
            self.version += 1
