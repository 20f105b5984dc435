import math

import numpy as np
import pytest

from budgetlm.train.selection import Verdict, judge, standard_error


@pytest.mark.parametrize("value, best, noise, min_delta, verdict", [
    (1.0, None, 0.1, 0.0, Verdict.BETTER),     # the first evaluation
    (0.85, 1.0, 0.1, 0.0, Verdict.BETTER),     # beyond the noise
    (0.95, 1.0, 0.1, 0.0, Verdict.SAME),       # an improvement within the noise
    (1.08, 1.0, 0.1, 0.0, Verdict.SAME),       # a decline within the noise
    (1.15, 1.0, 0.1, 0.0, Verdict.WORSE),      # beyond the noise
    (0.85, 1.0, 0.1, 0.1, Verdict.WORSE),      # beyond the noise, not by min_delta more
    (0.99, 1.0, 0.0, 0.0, Verdict.BETTER),     # an exact figure: the plain rule
    (1.0, 1.0, 0.0, 0.0, Verdict.WORSE),
    (0.99, 1.0, 0.0, 0.05, Verdict.WORSE),
])
def test_a_change_within_the_noise_is_neither_better_nor_worse(value, best, noise, min_delta, verdict):
    assert judge(value, best, noise=noise, min_delta=min_delta) is verdict


def test_standard_error_of_a_sample_mean_without_replacement():
    x = np.array([1.0, 2.0, 4.0, 7.0])
    population = 10
    expected = np.std(x, ddof=1) / math.sqrt(4) * math.sqrt(1 - 4 / population)
    assert standard_error(x, np.ones(4), population) == pytest.approx(expected)
    # sums over windows of equal length: the error of the mean per token is the windows' scaled down
    assert standard_error(x * 8, np.full(4, 8), population) == pytest.approx(expected)
    assert standard_error(x, np.ones(4), 4) == 0.0          # every unit: no sampling error
    assert standard_error(x[:1], np.ones(1), population) == 0.0
