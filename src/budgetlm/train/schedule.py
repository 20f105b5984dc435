"""Learning-rate schedules as functions of progress through the budget (0 → 1).

Keyed on progress rather than steps, a schedule reaches its floor exactly when the budget ends,
however fast the device turns out to be."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Schedule:
    kind: str = "wsd"             # wsd | cosine | linear | constant
    warmup: float = 0.02          # <1: fraction of progress; >=1: optimizer steps
    decay_fraction: float = 0.4   # wsd: final share of the budget spent decaying
    min_ratio: float = 0.0        # floor as a fraction of the peak

    def factor(self, progress: float, step: int) -> float:
        """Multiplier of the peak learning rate at this point of the run."""
        if self.warmup >= 1:
            if step < self.warmup:
                return (step + 1) / self.warmup
            warm_p = 0.0
        else:
            if progress < self.warmup:
                return max(progress / self.warmup, 1e-3)
            warm_p = self.warmup
        p = min(1.0, max(0.0, (progress - warm_p) / max(1.0 - warm_p, 1e-9)))  # progress after warmup
        if self.kind == "constant":
            decay = 1.0
        elif self.kind == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * p))
        elif self.kind == "linear":
            decay = 1.0 - p
        elif self.kind == "wsd":
            start = 1.0 - self.decay_fraction
            decay = 1.0 if p < start else 1.0 - (p - start) / max(self.decay_fraction, 1e-9)
        else:
            raise ValueError(f"unknown schedule {self.kind!r}")
        return self.min_ratio + (1.0 - self.min_ratio) * decay
