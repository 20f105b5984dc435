import json

import optuna
import pytest

from budgetlm.cli import SECTIONS, build_parser, main
from budgetlm.config import RunConfig, resolve
from budgetlm.errors import UserError
from budgetlm.train.optim import default_lr
from budgetlm.workflows import tune

TINY = ["--n-layer", "1", "--d-model", "32", "--n-head", "1", "--context", "32", "--micro-batch", "16",
        "--vocab-size", "300", "--compile", "off", "--eval-tokens", "512", "--val-fraction", "0.02"]
SPACE = '[tune]\nlr = {low = 1e-3, high = 3e-2, log = true}\noptim = ["adamw", "sgd"]\nn_layer = {low = 1, high = 2}\n'


def flags(play_file, *extra) -> dict:
    return vars(build_parser().parse_args(["pretrain", "--data", str(play_file), *TINY, *extra]))


def search(play_file, tmp_path, name="tune", *extra, trials=3, pruner=None, space=SPACE):
    config = tmp_path / f"{name}.toml"
    config.write_text("[train]\nmax_steps = 4\neval_every = \"1\"\noptim = \"adamw\"\n" + space)
    base, table = tune.load_config(str(config), flags(play_file, *extra), SECTIONS)
    result = tune.run(base, tune.parse_space(table, base), tmp_path / name, trials=trials, pruner=pruner)
    return result, tmp_path / name


class PruneTrial2(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return trial.number == 2


def test_trials_are_recorded_pruned_and_the_best_config_reruns(play_file, tmp_path, capsys):
    result, out = search(play_file, tmp_path, pruner=PruneTrial2())
    rows = json.loads((out / "trials.json").read_text())
    assert [r["number"] for r in rows] == [0, 1, 2]
    assert [r["state"] for r in rows] == ["complete", "complete", "pruned"]
    assert rows[2]["stop_reason"] == "pruned"
    # trial 0 is the config as given, where the space holds it (lr is automatic, so it is sampled)
    assert rows[0]["params"]["optim"] == "adamw" and rows[0]["params"]["n_layer"] == 1
    for r in rows:
        assert set(r["params"]) == {"lr", "optim", "n_layer"}
        assert 1e-3 <= r["params"]["lr"] <= 3e-2 and isinstance(r["params"]["n_layer"], int)
        assert r["best_val_bpb"] > 0 and r["wall_s"] > 0
        assert (out / f"trial-{r['number']:03d}" / "summary.json").is_file()
    best = min(rows[:2], key=lambda r: r["best_val_bpb"])
    assert result["best_trial"] == best["number"]

    cfg = resolve(RunConfig, SECTIONS, str(out / "best.toml"), {})
    assert cfg.train.lr == pytest.approx(best["params"]["lr"])
    assert (cfg.train.optim, cfg.model.n_layer, cfg.train.max_steps) == (best["params"]["optim"],
                                                                         best["params"]["n_layer"], 4)
    assert main(["pretrain", "--config", str(out / "best.toml"), "--out", str(tmp_path / "rerun"), "--quiet"]) == 0
    rerun = json.loads((tmp_path / "rerun" / "summary.json").read_text())
    assert rerun["best_val_bpb"] == pytest.approx(best["best_val_bpb"], rel=1e-4)  # seeded: the same run again

    report = (out / "trials.md").read_text()
    assert "| 2 | pruned |" in report and "★" in report
    assert (out / "tune.png").read_bytes().startswith(b"\x89PNG")
    assert "| trial | state |" in capsys.readouterr().out


def test_the_seed_decides_the_trials(play_file, tmp_path):
    params = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        result, _ = search(play_file, tmp_path, name, "--seed", seed, "--max-steps", "1", trials=2)
        params[name] = [t["params"] for t in result["trials"]]
    assert params["a"] == params["b"]
    assert params["a"][1:] != params["c"][1:]


def test_no_trial_starts_that_the_total_budget_cannot_hold(play_file, tmp_path):
    base = resolve(RunConfig, SECTIONS, None, flags(play_file))
    space = tune.parse_space({"lr": {"low": 1e-3, "high": 1e-2}}, base)
    result = tune.run(base, space, tmp_path / "t", total_budget="12s", trial_budget="5s", trials=5)
    assert len(result["trials"]) == 1  # a 5 s trial and the reserve for the reports leave too little for another
    with pytest.raises(UserError, match="cannot hold one trial"):
        tune.run(base, space, tmp_path / "u", total_budget="5s", trial_budget="3s")
    with pytest.raises(UserError, match="--total-budget"):
        tune.run(base, space, tmp_path / "v", trial_budget="3s")


def test_default_space_starts_from_the_defaults_and_scales_the_automatic_lr(play_file):
    base = resolve(RunConfig, SECTIONS, None, flags(play_file, "--optim", "lamb"))
    space = tune.parse_space(tune.DEFAULT_SPACE, base)
    assert tune.baseline_params(space, base) == {"optim": "lamb", "lr_factor": 1.0, "warmup": 0.02,
                                                 "weight_decay": 0.1, "batch_tokens": "auto"}
    cfg, settings = tune.trial_config(base, {"optim": "muon", "lr_factor": 2.0, "batch_tokens": "4096"}, None)
    assert settings["lr"] == pytest.approx(2 * default_lr(32, "muon"))
    assert (cfg.train.optim, cfg.train.lr, cfg.train.batch_tokens) == ("muon", settings["lr"], 4096)
    cfg, settings = tune.trial_config(base, {"lr_factor": 1.0}, None)
    assert cfg.train.lr is None and "lr" not in settings  # the baseline keeps the automatic rate


@pytest.mark.parametrize("table,fragment", [
    ({"lrr": {"low": 1, "high": 2}}, "unknown key 'lrr'"),
    ({"lr": {"low": 1e-2, "high": 1e-3}}, "must be below high"),
    ({"lr": {"low": 0.0, "high": 1e-3, "log": True}}, "needs low > 0"),
    ({"lr": {"min": 1e-3, "high": 1e-2}}, "unknown: min"),
    ({"optim": ["adamw", "nadam"]}, "'nadam' is not allowed"),
    ({"n_layer": {"low": 1.5, "high": 4}}, "n_layer: expected int"),
    ({"dropout": 0.1}, "give a list of choices or a range"),
    ({"lr": {"low": 1e-3, "high": 1e-2}, "lr_factor": {"low": 0.5, "high": 2.0}}, "not both"),
    ({}, "is empty"),
])
def test_bad_search_space_is_one_clear_error(play_file, table, fragment):
    base = resolve(RunConfig, SECTIONS, None, flags(play_file))
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        tune.parse_space(table, base)


def test_tune_table_is_split_from_the_config(play_file, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[model]\nn_layer = 3\n[tune]\nwarmup = {low = 0, high = 0.1}\n')
    base, table = tune.load_config(str(config), flags(play_file, "--dropout", "0.1"), SECTIONS)
    assert base.model.dropout == 0.1 and table == {"warmup": {"low": 0, "high": 0.1}}
    assert base.model.n_layer == 1  # the flag overrides the file
    assert tune.parse_space(table, base)[0].integer is False  # warmup takes floats
    config.write_text('[modle]\nn_layer = 3\n')
    with pytest.raises(UserError, match=r"unknown table \[modle\]"):
        tune.load_config(str(config), {}, SECTIONS)
