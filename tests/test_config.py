"""Config values from TOML, flags and Python: a wrong type or a number that is not finite is one UserError line
naming the field; an accepted value comes back exactly from the TOML the run saves."""

import tomllib

import pytest

from budgetlm.cli import main
from budgetlm.config import RUN_SECTIONS, FinetuneConfig, FinetuneRunConfig, RunConfig, apply, resolve, to_toml
from budgetlm.errors import UserError

TINY = ["--max-steps", "1", "--n-layer", "1", "--d-model", "32", "--n-head", "1", "--context", "32", "--vocab-size", "300",
        "--compile", "off", "--quiet", "--no-calibrate"]  # a short run, should a flag be accepted

def refused(tmp_path, toml: str, run_cls=RunConfig, sections=RUN_SECTIONS) -> str:
    path = tmp_path / "c.toml"
    path.write_text(toml, encoding="utf-8")
    with pytest.raises(UserError) as caught:
        resolve(run_cls, sections, str(path), {})
    message = str(caught.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("line, field", [
    ("budget = [1]", "budget"),
    ("budget = inf", "budget"),
    ("budget = -inf", "budget"),
    ("budget = nan", "budget"),
    ("budget = true", "budget"),
    ("budget = 1979-05-27", "budget"),
    (f"budget = \"{'9' * 400}\"", "budget"),  # a number too large for a float
    ("budget = {minutes = 5}", "budget"),
    ("batch_tokens = inf", "batch_tokens"),
    ("batch_tokens = \"1e400\"", "batch_tokens"),
    ("eval_every = \"²\"", "eval_every"),
    ("save_every = [30]", "save_every"),
    ("early_stop = \"val_loss,3,inf\"", "early_stop"),
    ("lr = inf", "lr"),
    ("lr = [0.1]", "lr"),
    ("max_steps = 2.5", "max_steps"),
    ("optim_args = inf", "optim_args"),
])
def test_a_wrong_type_or_a_number_that_is_not_finite_is_one_line_naming_the_field(tmp_path, line, field):
    message = refused(tmp_path, f"[train]\n{line}\n")
    assert f"[train] {field}:" in message


def test_the_finetune_table_refuses_them_too(tmp_path):
    sections = {"finetune": FinetuneConfig}
    assert "[finetune] members:" in refused(tmp_path, "[finetune]\nmembers = inf\n", FinetuneRunConfig, sections)
    assert "[finetune] budget:" in refused(tmp_path, "[finetune]\nbudget = [1]\n", FinetuneRunConfig, sections)


def round_trip(run_cls, table, key, value):
    run = run_cls()
    apply(getattr(run, table), {key: value})
    again = run_cls()
    for name, values in tomllib.loads(to_toml(run)).items():
        apply(getattr(again, name), values)
    return getattr(getattr(run, table), key), getattr(getattr(again, table), key)


@pytest.mark.parametrize("key, value", [
    ("budget", 7.199999999999999e16),  # whole seconds past 2**53: hours, minutes and seconds summed exactly
    ("budget", 1.967406185727476e37),
    ("budget", 1.2345678),             # a fraction of a second kept to the last digit
    ("budget", 1e-05),
    ("budget", "1h30m"),
    ("eval_every", "1.2345678s"),
    ("save_every", "0.00001s"),
    ("early_stop", "val_bpb,3,0.0012345678"),
    ("early_stop", "val_bpb,3,1e-300"),
])
def test_an_accepted_value_comes_back_exactly_from_the_saved_toml(key, value):
    stored, again = round_trip(RunConfig, "train", key, value)
    assert again == stored


@pytest.mark.parametrize("args, fragment", [
    (["--tokenizer", ""], "tokenizer: '' is blank"),    # was: silently trained a tokenizer
    (["--resume", " "], "resume: ' ' is blank"),        # was: silently a fresh start
    (["--tracking-uri", ""], "tracking_uri: '' is blank"),  # was: an MLflow database in the working folder
    (["--data", ""], "data: '' is blank"),
    (["--seed", str(2 ** 64)], "seed: 18446744073709551616 is out of range; it must be >= 0 and <= 9223372036854775807"),
    (["--micro-batch", "0"], "micro_batch: 0 is out of range; it must be >= 1"),
    (["--batch-tokens", "-1"], "give a positive number of tokens or auto"),
    (["--lr", "0"], "lr: 0.0 is out of range; it must be > 0"),
    (["--warmup", "-5"], "warmup: -5.0 is out of range; it must be >= 0"),
    (["--lr", "nan"], "lr: nan is not a finite number; give a number > 0"),
    (["--budget", "0"], "budget: duration '0' must be positive"),
])
def test_a_blank_or_out_of_range_flag_is_one_line_before_any_work(play_file, tmp_path, capsys, args, fragment):
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(play_file), *TINY, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and fragment in err
    assert not out.exists()


def test_text_where_empty_means_none_may_be_empty():
    run = RunConfig()
    apply(run.train, {"report_to": "", "optim_args": ""})
    assert (run.train.report_to, run.train.optim_args) == ("", "")
    finetune = FinetuneConfig()
    apply(finetune, {"augment": ""})
    with pytest.raises(UserError, match="split_seed: -1 is out of range"):
        apply(finetune, {"split_seed": -1})
