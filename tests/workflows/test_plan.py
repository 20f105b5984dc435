import json
import re
from pathlib import Path

import pytest

from budgetlm.cli import main
from budgetlm.models.config import ModelConfig
from budgetlm.workflows import compare

DOCS = Path(__file__).resolve().parents[2] / "docs" / "planner.md"
SMALL = ["--vocab-size", "512", "--compile", "off"]


def documented_fields() -> set[str]:
    """The `plan --json` fields docs/planner.md lists: the first column of its field table, `a.b` for nested ones."""
    section = DOCS.read_text().split("## `budgetlm plan --json`", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_.]+)` \|", section, flags=re.MULTILINE))


def fields_of(record: dict) -> set[str]:
    found = set()
    for key, value in record.items():
        found.add(key)
        if isinstance(value, dict):
            found |= {f"{key}.{inner}" for inner in value}
    return found


def test_plan_json_has_the_documented_fields(play_file, capsys):
    assert main(["plan", "--data", str(play_file), "--budget-flops", "1e11", "--json", *SMALL]) == 0
    record = json.loads(capsys.readouterr().out)
    documented = documented_fields()
    assert {"model.n_layer", "model.d_model", "model.n_head", "training.lr", "candidates"} <= documented
    # every documented field is there, and every field there is documented (the model's config as a whole)
    config_fields = {f"model.{name}" for name in ModelConfig().to_dict()}
    assert documented <= fields_of(record)
    assert fields_of(record) - documented <= config_fields
    assert record["planned"] and record["budget"]["flops"] == 1e11
    chosen = [c for c in record["candidates"] if (c["n_layer"], c["d_model"]) ==
              (record["model"]["n_layer"], record["model"]["d_model"])]
    assert len(chosen) == 1 and chosen[0]["fits"]


def test_pretrain_follows_and_saves_the_plan_and_a_flop_budget_stops_it(play_file, tmp_path, capsys):
    flags = ["--data", str(play_file), "--budget-flops", "6e10", *SMALL]
    assert main(["plan", *flags, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    out = tmp_path / "run"
    assert main(["pretrain", *flags, "--out", str(out), "--quiet", "--no-calibrate"]) == 0
    saved = json.loads((out / "plan.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert saved["model"] == shown["model"] and saved["training"]["lr"] == shown["training"]["lr"]
    assert {k: summary["model"][k] for k in ("n_layer", "d_model", "n_head")} == \
        {k: shown["model"][k] for k in ("n_layer", "d_model", "n_head")}
    assert summary["stop_reason"] == "max_flops"
    assert summary["flops"] == summary["tokens_seen"] * summary["flops_per_token"]
    assert summary["flops"] == pytest.approx(6e10, rel=0.03)
    assert summary["steps"] == pytest.approx(shown["training"]["steps"], rel=0.03)


def test_plan_text_shows_each_choice_and_the_shapes_weighed(play_file, capsys):
    assert main(["plan", "--data", str(play_file), "--budget-flops", "1e11", *SMALL]) == 0
    text = capsys.readouterr().out
    for part in ("device", "parameters", "without the embedding", "epochs", "micro-batch", "steps", "lr",
                 "warmup", "ranked by predicted loss", "assumed"):
        assert part in text


def test_a_given_shape_is_shown_unplanned(play_file, capsys):
    assert main(["plan", "--data", str(play_file), "--max-steps", "5", "--n-layer", "1", "--d-model", "32",
                 "--n-head", "1", "--json", *SMALL]) == 0
    record = json.loads(capsys.readouterr().out)
    assert not record["planned"] and record["candidates"] == []
    assert (record["model"]["n_layer"], record["model"]["d_model"]) == (1, 32) and record["training"]["steps"] == 5


def test_compare_takes_a_flop_budget_as_the_variants_limit(play_file):
    from budgetlm.config import RUN_SECTIONS, RunConfig, resolve

    cfg = resolve(RunConfig, RUN_SECTIONS, None, {"data": [str(play_file)], "budget_flops": 1e11})
    found = compare.variants(cfg, vary=["optim=adamw,muon"])
    assert [v.config.train.budget_flops for v in found] == [1e11, 1e11]
