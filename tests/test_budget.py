import time

import pytest

from budgetlm.budget import Budget, EarlyStop, Every, format_duration, parse_duration
from budgetlm.errors import UserError


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("5m", 300), ("1h30m", 5400), ("2.5h", 9000),
                                          ("300", 300), ("1m30s", 90), ("250ms", 0.25), (" 2m ", 120)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5 minutes", "m5", "-3s", "0s", "1x", "5m-"])
def test_parse_duration_rejects(text):
    with pytest.raises(UserError):
        parse_duration(text)


def test_format_duration():
    assert format_duration(5) == "5s"
    assert format_duration(125) == "2m05s"
    assert format_duration(3725) == "1h02m05s"


def test_progress_is_the_largest_share_of_any_limit():
    b = Budget(seconds=1000, max_steps=100, max_tokens=10_000)
    assert b.progress(50, 1000) == pytest.approx(0.5, abs=1e-3)
    assert b.progress(10, 8000) == pytest.approx(0.8, abs=1e-3)
    assert Budget(max_steps=10).progress(20, 0) == 1.0


def test_time_progress_and_resumed_clock():
    b = Budget(seconds=10, spent_s=5)
    assert b.progress(0, 0) == pytest.approx(0.5, abs=0.01)
    assert b.progress(0, 0, reserve_s=5) == 1.0
    assert b.exhausted(0, 0, reserve_s=5) == "budget"
    assert b.exhausted(0, 0) is None


def test_exhausted_reasons():
    assert Budget(max_steps=3).exhausted(3, 0) == "max_steps"
    assert Budget(max_tokens=100).exhausted(1, 100) == "max_tokens"
    b = Budget(seconds=0.05)
    time.sleep(0.06)
    assert b.exhausted(0, 0) == "budget"


def test_no_limit_is_an_error():
    with pytest.raises(UserError, match="--budget"):
        Budget()


def test_the_config_offers_exactly_the_optimizers_and_schedules_training_builds():
    from budgetlm import config
    from budgetlm.train import optim, schedule

    assert set(config.OPTIMIZERS) == set(optim.OPTIMIZERS) == set(optim.OPTIM_ARGS)
    assert set(config.SCHEDULES) == set(schedule.SCHEDULES)


@pytest.mark.parametrize("text, steps, seconds", [("100", 100, None), ("30s", None, 30.0), ("1m30s", None, 90.0)])
def test_intervals_are_read_once_into_steps_or_seconds(text, steps, seconds):
    every = Every.parse(text)
    assert (every.steps, every.seconds) == (steps, seconds)
    assert Every.parse(str(every)) == every


@pytest.mark.parametrize("text", ["0", "-3", "soon", "", "3x"])
def test_bad_intervals_are_refused(text):
    with pytest.raises(UserError):
        Every.parse(text)


def test_early_stopping_rules_are_read_once_with_their_direction():
    rule = EarlyStop.parse("val_accuracy,3,0.01")
    assert (rule.metric, rule.patience, rule.min_delta, rule.mode) == ("val_accuracy", 3, 0.01, "max")
    assert EarlyStop.parse("val_bpb,2").mode == "min"
    for bad in ("val_bpb", "val_bpb,x", ",3", "val_bpb,-1"):
        with pytest.raises(UserError):
            EarlyStop.parse(bad)


def test_a_flop_budget_ends_at_the_step_nearest_its_flops():
    b = Budget(max_flops=10_000, flops_per_token=10)  # 1,000 tokens
    assert b.exhausted(0, 0) is None
    # steps of 300 tokens: after 3 (900) a fourth would end 200 past the budget, stopping leaves 100: stop
    assert b.exhausted(3, 900) == "max_flops"
    # steps of 120 tokens: after 7 (840) an eighth ends at 960, 40 short: go on; after 8 a ninth would end 80 past
    assert b.exhausted(7, 840) is None
    assert b.exhausted(8, 960) == "max_flops"
    assert b.progress(5, 500) == pytest.approx(0.5)
    assert "1e+04 FLOPs" in b.describe()


def test_a_flop_budget_is_a_limit():
    Budget(max_flops=1e12)  # no error: FLOPs alone bound a run
    with pytest.raises(UserError, match="--budget-flops"):
        Budget()
