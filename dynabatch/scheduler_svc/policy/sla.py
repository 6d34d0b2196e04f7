"""Algorithm 2 (arXiv 2503.05248 §III.B, reconstructed): the SLA band controller.

After each fresh measurement D of per-token decode latency at batch size b, with target SLA:
  D > SLA·(1+eps): b_high = max(b/2, b_low+1); b_low -= d      (back off fast)
  D < SLA·(1−eps): b_low = max(b, b_low);      b_high = min(max(b_high, b_low) + a, b_max)
  otherwise:       re-centre the band on b (keep its width, narrowed to fit [b_min, b_max])
and b_SLA is the band's midpoint. Two refinements of DESIGN.md's rule, both found by simulating
D(b) = a + c·b (tests/policy/test_sla.py):
  * eps is relative to the target, so one default suits any SLA;
  * the steps are proportional to the batch: a = clamp(step·b, 1, alpha), d = clamp(step·b, 1,
    delta). With fixed steps the band limit-cycles by ±alpha/2 around small optima (b* ≲ 4·alpha
    never settled within ±10%); proportional steps settle for b* from 8 to b_max.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SlaController:
    b_min: int
    b_max: int
    eps: float
    alpha: int
    delta: int
    step: float = 0.05
    b_low: float = 0.0
    b_high: float = 0.0
    updates: int = 0

    def __post_init__(self) -> None:
        if self.b_high <= 0:            # start with the whole range: b_SLA = its midpoint
            self.b_low, self.b_high = float(self.b_min), float(self.b_max)

    @property
    def b_sla(self) -> int:
        return int((self.b_low + self.b_high) // 2)

    def update(self, latency_s: float, batch_size: float, target_s: float) -> int:
        """Feed one fresh measurement (latency per output token at this batch size); returns the
        new b_SLA."""
        b = min(max(batch_size, float(self.b_min)), float(self.b_max))
        move = max(1.0, self.step * b)
        if latency_s > target_s * (1 + self.eps):
            self.b_high = max(b / 2, self.b_low + 1)
            self.b_low = self.b_low - min(move, self.delta)
        elif latency_s < target_s * (1 - self.eps):
            self.b_low = max(b, self.b_low)
            self.b_high = max(self.b_high, self.b_low) + min(move, self.alpha)
        else:
            half = min(self.b_high - self.b_low, 2 * (b - self.b_min), 2 * (self.b_max - b)) / 2
            self.b_low, self.b_high = b - half, b + half
        self._clamp()
        self.updates += 1
        return self.b_sla

    def _clamp(self) -> None:
        lo, hi = float(self.b_min), float(self.b_max)
        self.b_low = min(max(self.b_low, lo), hi)
        self.b_high = min(max(self.b_high, self.b_low), hi)
