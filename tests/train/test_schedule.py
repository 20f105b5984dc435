import json
import math

import pytest

from budgetlm.errors import UserError
from budgetlm.train.schedule import SCHEDULES, Schedule


def step_clock(total_steps: int) -> list[float]:
    """Progress at the start of each step when the budget is a number of steps."""
    return [s / total_steps for s in range(total_steps)]


def time_clock(durations: list[float]) -> list[float]:
    """Progress at the start of each step when the budget is the total time of uneven steps."""
    total, elapsed, progress = sum(durations), 0.0, []
    for d in durations:
        progress.append(elapsed / total)
        elapsed += d
    return progress


# 100 slow steps take half the time, 600 fast ones the other half: progress 0.5 at step 100.
UNEVEN = time_clock([3.0] * 100 + [0.5] * 600)


# --- warmup ---------------------------------------------------------------------------------------

def test_warmup_in_steps():
    s = Schedule("constant", warmup=10)
    assert [s.factor(0.0, step) for step in (0, 4, 9, 10, 500)] == [0.1, 0.5, 1.0, 1.0, 1.0]


def test_warmup_as_a_fraction_of_progress():
    s = Schedule("constant", warmup=0.1)
    assert s.factor(0.05, step=7) == pytest.approx(0.5)
    assert s.factor(0.0, step=0) == 1e-3   # never exactly zero
    assert s.factor(0.1, step=3) == 1.0


# --- shapes over the run --------------------------------------------------------------------------

@pytest.mark.parametrize("kind,shape", [
    ("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p))),
    ("linear", lambda p: 1 - p),
    ("wsd", lambda p: 1.0 if p < 0.6 else 1 - (p - 0.6) / 0.4),
    ("constant", lambda p: 1.0),
])
def test_shapes_descend_onto_the_floor(kind, shape):
    s = Schedule(kind, warmup=0.2, decay_fraction=0.4, min_ratio=0.1)
    for progress in (0.2, 0.35, 0.6, 0.68, 0.8, 0.9, 1.0):
        p = (progress - 0.2) / 0.8
        expected = 1.0 if kind == "constant" else 0.1 + 0.9 * shape(p)
        assert s.factor(progress, step=123) == pytest.approx(expected)
    if kind != "constant":
        assert s.factor(1.0, step=0) == pytest.approx(0.1)


def test_exponential_reaches_gamma_when_the_budget_ends():
    s = Schedule("exponential", warmup=0.2, gamma=0.01)
    for progress in (0.2, 0.4, 0.6, 1.0):
        assert s.factor(progress, step=0) == pytest.approx(0.01 ** ((progress - 0.2) / 0.8))
    # the same function of progress on either clock: the step count does not matter
    half_way = 0.01 ** (0.3 / 0.8)
    assert s.factor(UNEVEN[100], step=100) == s.factor(step_clock(200)[100], step=100) == pytest.approx(half_way)
    floored = Schedule("exponential", warmup=0.0, gamma=0.01, min_ratio=0.05)
    assert floored.factor(0.5, 0) == pytest.approx(0.1) and floored.factor(0.9, 0) == 0.05


# --- multiplicative decays ------------------------------------------------------------------------

def test_step_decay_in_steps_equals_the_fraction_on_a_step_clock():
    by_fraction = Schedule("step", warmup=0, gamma=0.5, step_size=0.25)
    by_steps = Schedule("step", warmup=0, gamma=0.5, step_size=250)
    for step, progress in enumerate(step_clock(1000)):
        expected = 0.5 ** (step // 250)
        assert by_fraction.factor(progress, step) == by_steps.factor(progress, step) == expected


def test_step_decay_on_a_time_clock_follows_its_own_unit():
    by_fraction = Schedule("step", warmup=0, gamma=0.5, step_size=0.25)
    by_steps = Schedule("step", warmup=0, gamma=0.5, step_size=250)
    fraction_factors = [by_fraction.factor(p, step) for step, p in enumerate(UNEVEN)]
    step_factors = [by_steps.factor(p, step) for step, p in enumerate(UNEVEN)]
    # progress reaches 0.25, 0.5, 0.75 at steps 50, 100, 400
    assert fraction_factors == [0.5 ** sum(step >= b for b in (50, 100, 400)) for step in range(700)]
    assert step_factors == [0.5 ** (step // 250) for step in range(700)]


def test_step_decay_is_floored_and_exact_on_fraction_boundaries():
    s = Schedule("step", warmup=0, gamma=0.1, step_size=0.1, min_ratio=0.002)
    assert s.factor(0.29, 0) == pytest.approx(0.01)
    assert s.factor(0.3, 0) == 0.002   # 0.1³ is below the floor
    assert Schedule("step", warmup=0, gamma=0.5, step_size=0.1).factor(0.3, 0) == 0.125  # 0.3 / 0.1 = 2.999…


def test_inverse_sqrt_in_steps_and_in_progress():
    in_steps = Schedule("inverse-sqrt", warmup=100)
    assert in_steps.factor(0.0, 99) == 1.0
    assert in_steps.factor(0.0, 399) == pytest.approx(0.5)
    assert in_steps.factor(0.0, 9999) == pytest.approx(0.1)
    in_progress = Schedule("inverse-sqrt", warmup=0.04, min_ratio=0.3)
    assert in_progress.factor(0.04, 5) == 1.0
    assert in_progress.factor(0.16, 5) == pytest.approx(0.5)
    assert in_progress.factor(1.0, 5) == 0.3   # sqrt(0.04) = 0.2 is below the floor


def test_inverse_sqrt_needs_a_warmup():
    with pytest.raises(UserError, match="inverse-sqrt needs a warmup"):
        Schedule("inverse-sqrt", warmup=0)


# --- plateau --------------------------------------------------------------------------------------

def test_plateau_reduces_after_patience_evaluations_without_improvement():
    s = Schedule("plateau", warmup=0, gamma=0.5, patience=2, min_ratio=0.2)
    factors = []
    for loss in (3.0, 2.9, 2.95, 2.92, 2.91, 2.93, 2.5, 2.6, 2.4, 2.7, 2.8, 2.9, 2.9):
        s.observe(loss)
        factors.append(s.factor(0.5, 10))
    # bad evaluations: 2.95, 2.92 → ×0.5; 2.91, 2.93 → ×0.5; 2.5 improves; 2.6 bad, 2.4 improves;
    # 2.7, 2.8 → ×0.5 (0.125, held at the floor 0.2); 2.9, 2.9 → again, still the floor
    assert factors == [1, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.25, 0.2, 0.2, 0.2]


def test_plateau_min_delta_discounts_tiny_improvements():
    s = Schedule("plateau", warmup=0, gamma=0.5, patience=1, min_delta=0.05)
    for loss in (3.0, 2.97, 2.96):
        s.observe(loss)
    assert s.factor(0.5, 10) == 0.25


def test_plateau_state_survives_a_json_round_trip():
    s = Schedule("plateau", warmup=0, gamma=0.5, patience=2)
    for loss in (3.0, 2.0, 2.5, 2.4, 2.6):   # one reduction, then one bad evaluation pending
        s.observe(loss)
    resumed = Schedule("plateau", warmup=0, gamma=0.5, patience=2)
    resumed.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert resumed.factor(0.5, 10) == 0.5
    resumed.observe(2.1)                     # the second bad evaluation since the best (2.0)
    assert resumed.factor(0.5, 10) == 0.25


def test_other_schedules_ignore_observations():
    s = Schedule("cosine", warmup=0)
    before = s.factor(0.5, 10)
    for loss in (1.0, 2.0, 3.0, 4.0):
        s.observe(loss)
    assert s.factor(0.5, 10) == before


# --- every kind -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", SCHEDULES)
def test_every_schedule_stays_between_its_floor_and_the_peak(kind):
    s = Schedule(kind, warmup=0.05, min_ratio=0.1, step_size=0.2)
    for step, progress in enumerate(UNEVEN):
        f = s.factor(progress, step)
        assert (0 < f <= 1) and (progress < 0.05 or f >= 0.1 - 1e-12)


@pytest.mark.parametrize("kwargs,message", [
    ({"kind": "triangle"}, "choose one of wsd, cosine"),
    ({"warmup": -1}, "warmup"),
    ({"min_ratio": 1.5}, "floor"),
    ({"gamma": 0.0}, "gamma"),
    ({"gamma": 2.0}, "gamma"),
    ({"step_size": 0}, "step_size"),
    ({"patience": 0}, "patience"),
])
def test_bad_settings_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        Schedule(**kwargs)
