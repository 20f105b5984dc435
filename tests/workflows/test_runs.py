import json

import pytest

from budgetlm.cli import main
from budgetlm.errors import UserError
from budgetlm.workflows import runs


def make_run(folder, summary, config):
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.json").write_text(json.dumps(config))


def lm(bpb, stop="budget"):
    return {"best_val_bpb": bpb, "params": 1_234_567, "budget_s": 300.0, "steps": 99, "stop_reason": stop}


GPT = {"arch": "gpt", "n_layer": 4, "d_model": 256}


def test_runs_are_listed_best_first_by_their_metric(tmp_path, capsys):
    make_run(tmp_path / "a", lm(2.5), GPT)
    make_run(tmp_path / "cmp" / "optim=muon", lm(2.1, "max_steps"), GPT)
    make_run(tmp_path / "sst2", {"best_val_accuracy": 0.81, "params": 5000, "budget_s": None, "steps": 40,
                                 "stop_reason": "epochs"}, {"arch": "classifier", "body": "lstm", "members": 1})
    make_run(tmp_path / "sst2b", {"best_val_accuracy": 0.85, "params": 5000, "budget_s": 60, "stop_reason": "budget"},
             {"arch": "classifier", "body": "gpt", "members": 3})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{cut sh")
    (tmp_path / "a" / "checkpoints" / "step-1").mkdir(parents=True)
    (tmp_path / "a" / "checkpoints" / "step-1" / "summary.json").write_text(json.dumps(lm(1.0)))

    rows = runs.run(tmp_path)
    assert [r["name"] for r in rows] == ["cmp/optim=muon", "a", "sst2b", "sst2"]
    assert rows[0]["arch"] == "gpt 4×256" and rows[0]["size"] == "1.23M" and rows[0]["budget"] == "5m00s"
    assert rows[0]["stop"] == "max_steps" and rows[2]["arch"] == "gpt classifier ×3" and rows[3]["budget"] == "40 steps"
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["name", "date", "architecture", "size", "budget", "metric", "stop"]
    assert "val_bpb 2.1000" in table[1] and table[1].startswith("cmp/optim=muon")

    assert main(["runs", str(tmp_path), "--json"]) == 0
    assert [r["value"] for r in json.loads(capsys.readouterr().out)] == [2.1, 2.5, 0.85, 0.81]


def test_an_empty_or_absent_folder(tmp_path, capsys):
    assert runs.run(tmp_path) == []
    assert "no runs under" in capsys.readouterr().out
    with pytest.raises(UserError, match="no such folder"):
        runs.run(tmp_path / "absent")
