"""Learning-rate schedules as functions of progress through the budget (0 → 1) and of the step.

Keyed on progress rather than steps, a schedule reaches its floor exactly when the budget ends,
however fast the device turns out to be. The loop computes progress from whichever clock bounds
the run (time, steps or tokens); lengths below 1 are fractions of it, lengths of 1 or more count
optimizer steps.

Two families after the linear warmup:
- shapes over the run (wsd, cosine, linear, exponential) follow the progress made since warmup
  and end at their final value when the budget ends;
- multiplicative decays (step, inverse-sqrt, plateau) follow the clock from the start of training
  (or the evaluations) and never end by themselves.
Every kind stays at or above `min_ratio` after warmup: wsd, cosine and linear descend onto it,
the others are cut off at it, so a step decay still multiplies by exactly `gamma`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from budgetlm.errors import UserError

SCHEDULES = ("wsd", "cosine", "linear", "constant", "step", "exponential", "inverse-sqrt", "plateau")


@dataclass
class Schedule:
    kind: str = "wsd"             # one of SCHEDULES
    warmup: float = 0.02          # <1: fraction of progress; >=1: optimizer steps
    decay_fraction: float = 0.4   # wsd: final share of the budget spent decaying
    min_ratio: float = 0.0        # floor as a fraction of the peak
    gamma: float = 0.1            # step, plateau: multiplier per reduction; exponential: total decay over the run
    step_size: float = 0.25       # step: interval between reductions, <1: fraction of progress; >=1: optimizer steps
    patience: int = 2             # plateau: evaluations without improvement before a reduction
    min_delta: float = 0.0        # plateau: smallest drop of the metric that counts as improvement

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise UserError(f"unknown schedule {self.kind!r}; choose one of {', '.join(SCHEDULES)}")
        checks = [
            (self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}"),
            (0 <= self.min_ratio <= 1, f"the learning-rate floor must lie in [0, 1], got {self.min_ratio}"),
            (0 <= self.decay_fraction <= 1, f"decay_fraction must lie in [0, 1], got {self.decay_fraction}"),
            (0 < self.gamma <= 1, f"gamma must lie in (0, 1], got {self.gamma}"),
            (self.step_size > 0, f"step_size must be > 0, got {self.step_size}"),
            (self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
            (self.kind != "inverse-sqrt" or self.warmup > 0,
             "inverse-sqrt needs a warmup > 0: the warmup length is its time scale"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"schedule {self.kind}: {message}")
        # plateau state: the current multiplier, the best metric seen, evaluations since it improved
        self._scale, self._best, self._bad = 1.0, None, 0

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
            return 1.0
        if self.kind in ("cosine", "linear", "wsd"):
            return self.min_ratio + (1.0 - self.min_ratio) * self._shape(p)
        if self.kind == "exponential":
            decay = self.gamma**p
        elif self.kind == "step":
            clock = step if self.step_size >= 1 else progress
            decay = self.gamma ** math.floor(clock / self.step_size + 1e-9)  # 1e-9: 0.3 / 0.1 is 2.999…
        elif self.kind == "inverse-sqrt":
            decay = math.sqrt(self.warmup / (step + 1)) if self.warmup >= 1 else math.sqrt(self.warmup / progress)
        else:  # plateau
            decay = self._scale
        return max(self.min_ratio, decay)

    def _shape(self, p: float) -> float:
        if self.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * p))
        if self.kind == "linear":
            return 1.0 - p
        start = 1.0 - self.decay_fraction  # wsd
        return 1.0 if p < start else 1.0 - (p - start) / max(self.decay_fraction, 1e-9)

    def observe(self, value: float) -> None:
        """Report the monitored metric of an evaluation (lower is better). A plateau schedule
        multiplies the rate by `gamma` after `patience` evaluations without improvement; the other
        kinds ignore it."""
        if self.kind != "plateau":
            return
        if self._best is None or value < self._best - self.min_delta:
            self._best, self._bad = value, 0
            return
        self._bad += 1
        if self._bad >= self.patience:
            self._scale *= self.gamma
            self._bad = 0

    def state_dict(self) -> dict:
        """What `observe` has changed, JSON-serializable, for resuming a run."""
        return {"scale": self._scale, "best": self._best, "bad": self._bad}

    def load_state_dict(self, state: dict) -> None:
        self._scale, self._best, self._bad = float(state["scale"]), state["best"], int(state["bad"])
