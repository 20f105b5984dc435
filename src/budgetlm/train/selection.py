"""Whether an evaluation beat the best so far, given the noise of a sampled validation figure.

Evaluations during training score a sample of the validation set, so two of them differ by chance
as well as by what the model learned. A change no larger than the sample mean's standard error is
taken as no change: it neither resets early stopping's patience nor counts against it."""

from __future__ import annotations

import math
from enum import Enum

import numpy as np


class Verdict(Enum):
    BETTER = "better"   # improved by more than min_delta beyond the noise
    SAME = "same"       # within the noise either way
    WORSE = "worse"     # no improvement that counts


def judge(value: float, best: float | None, *, noise: float = 0.0, min_delta: float = 0.0) -> Verdict:
    """Compare `value` with `best` (both oriented so that lower is better; None: nothing yet).
    `noise`: the standard error of the sampled figure (0 for an exact one, which keeps the plain rule:
    better by more than min_delta or else worse)."""
    if best is None or best - value > min_delta + noise:
        return Verdict.BETTER
    if noise > 0 and abs(value - best) <= noise:
        return Verdict.SAME
    return Verdict.WORSE


def standard_error(sums: np.ndarray, counts: np.ndarray, population: int) -> float:
    """Standard error of Σsums / Σcounts as an estimate of the whole population's ratio, from a
    sample of its units (validation windows, whose sums are nats over `counts` tokens; or examples,
    counts all 1) drawn without replacement from `population` units: the ratio estimator's linearized
    variance with the finite-population correction, so a sample of every unit has none. Zero when
    fewer than two units leave nothing to estimate it from."""
    m = len(sums)
    if m < 2:
        return 0.0
    ratio = sums.sum() / counts.sum()
    residual_var = float(np.sum((sums - ratio * counts) ** 2)) / (m - 1)
    return math.sqrt(residual_var / m * max(0.0, 1 - m / population)) / float(counts.mean())
