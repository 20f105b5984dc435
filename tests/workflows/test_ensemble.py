import json

import numpy as np
import pytest

from budgetlm.errors import UserError
from budgetlm.train.checkpoint import load_model
from budgetlm.workflows import ensemble, predict

from tests.workflows.test_finetune import config, read_jsonl, toy_rows, write_tsv


@pytest.fixture
def toy(tmp_path):
    return write_tsv(tmp_path / "train.tsv", toy_rows(400, 0)), write_tsv(tmp_path / "dev.tsv", toy_rows(100, 1))


@pytest.fixture
def pretrained(play_file, tmp_path):
    from budgetlm.cli import main

    folder = tmp_path / "pretrained"
    assert main(["pretrain", "--data", str(play_file), "--max-steps", "2", "--out", str(folder), "--n-layer", "1",
                 "--d-model", "32", "--n-head", "1", "--context", "64", "--vocab-size", "300", "--quiet"]) == 0
    return folder


def test_two_members_make_one_model_that_predict_reads(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(ensemble.Validation, "improves", lambda self, probs, monitor: True)  # keep both
    train, dev = toy
    out = tmp_path / "run"
    summary = ensemble.run(config(train, dev, max_steps=12, members="2"), out, quiet=True)
    assert [m["seed"] for m in summary["members"]] == [0, 1]
    assert all((out / "members" / str(k) / "summary.json").is_file() for k in range(2))
    for name in ("model.safetensors", "config.json", "tokenizer.json", "summary.json", "confusion.json",
                 "confusion.png", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0, name
    assert {r["member"] for r in read_jsonl(out / "metrics.jsonl")} == {0, 1}
    # the second member's evaluations score the ensemble it completes, and itself alone
    evals = [[r for r in read_jsonl(out / "members" / str(k) / "metrics.jsonl") if r["kind"] == "eval"]
             for k in range(2)]
    assert all("val_member_accuracy" not in r for r in evals[0])
    assert all("val_member_accuracy" in r for r in evals[1])
    assert summary["examples_seen"] == 2 * 12 * 32

    # the ensemble's probabilities are the mean of its members', and its reported accuracy is predict's
    texts = [t for t, _ in toy_rows(100, 1)]
    together = predict.run(out, texts=texts)
    apart = [predict.run(out / "members" / str(k), texts=texts) for k in range(2)]
    for i in (0, 17, 99):
        mean = {label: (apart[0][i]["probs"][label] + apart[1][i]["probs"][label]) / 2 for label in ("neg", "pos")}
        assert together[i]["probs"] == pytest.approx(mean, abs=1e-5)
    truth = [label for _, label in toy_rows(100, 1)]
    assert np.mean([p["label"] == t for p, t in zip(together, truth)]) == summary["best_val_accuracy"]
    model, saved, _ = load_model(out)
    assert saved["members"] == 2 and saved["extra"]["seeds"] == [0, 1]


def test_a_member_is_kept_only_if_it_improves_the_ensemble():
    validation = ensemble.Validation.__new__(ensemble.Validation)
    validation.y = np.array([0, 1, 1, 0])
    validation.probs = []
    right_but_two = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.3, 0.7]])  # accuracy 0.5
    assert validation.improves(right_but_two, "val_accuracy")  # the first member always
    validation.probs = [right_but_two]
    fixes_one = np.array([[0.6, 0.4], [0.1, 0.9], [0.4, 0.6], [0.6, 0.4]])  # averaged: 0.75
    assert validation.improves(fixes_one, "val_accuracy")
    assert not validation.improves(right_but_two, "val_accuracy")  # a copy adds nothing
    assert validation.improves(fixes_one, "val_loss") == (
        validation.score((right_but_two + fixes_one) / 2, "val_loss") > validation.score(right_but_two, "val_loss"))


def test_the_kept_members_are_those_that_improved_the_ensemble(toy, tmp_path):
    train, dev = toy
    out = tmp_path / "run"
    summary = ensemble.run(config(train, dev, max_steps=8, members="3"), out, quiet=True)
    texts = [t for t, _ in toy_rows(100, 1)]
    truth = np.array([label == "pos" for _, label in toy_rows(100, 1)], dtype=int)
    alone = [np.array([[p["probs"]["neg"], p["probs"]["pos"]] for p in predict.run(out / "members" / str(k),
                                                                                 texts=texts)]) for k in range(3)]
    kept = [alone[0]]
    for k in (1, 2):
        better = np.mean(np.mean([*kept, alone[k]], 0).argmax(1) == truth) > np.mean(np.mean(kept, 0).argmax(1) == truth)
        assert summary["members"][k]["kept"] == better
        if better:
            kept.append(alone[k])
    together = np.array([[p["probs"]["neg"], p["probs"]["pos"]] for p in predict.run(out, texts=texts)])
    np.testing.assert_allclose(together, np.mean(kept, 0), atol=1e-5)
    assert load_model(out)[1]["members"] == len(kept)


def test_members_of_a_fraction_split_hold_out_the_same_examples(tmp_path):
    train = write_tsv(tmp_path / "all.tsv", toy_rows(300, 3))
    summary = ensemble.run(config(train, max_steps=4, members="2", val_fraction=0.2), tmp_path / "run", quiet=True)
    assert summary["val_examples"] == 60
    data = [json.loads((tmp_path / "run" / "members" / str(k) / "summary.json").read_text()) for k in range(2)]
    assert [d["config"]["finetune"]["split_seed"] for d in data] == [0, 0]
    assert [d["config"]["finetune"]["seed"] for d in data] == [0, 1]


def test_auto_fills_the_time_an_epoch_limit_leaves(pretrained, toy, tmp_path):
    train, dev = toy
    summary = ensemble.run(config(train, dev, model=str(pretrained), max_steps=None, epochs=0.5, budget="60s"),
                           tmp_path / "run", quiet=True)
    assert len(summary["members"]) >= 2  # each member takes a few seconds of the minute
    assert all(m["stop_reason"] == "max_tokens" for m in summary["members"])
    assert summary["wall_s"] <= 60
    # without a time budget, or with one member asked for, the run is a single model as before
    single = ensemble.run(config(train, dev, model=str(pretrained), max_steps=None, epochs=0.5, budget="60s",
                                 members="1"), tmp_path / "single", quiet=True)
    assert "members" not in single and not (tmp_path / "single" / "members").exists()


def test_auto_keeps_one_member_when_the_first_takes_the_budget(pretrained, toy, tmp_path):
    train, dev = toy
    out = tmp_path / "run"
    summary = ensemble.run(config(train, dev, model=str(pretrained), max_steps=None, epochs=1000, budget="6s"), out,
                           quiet=True)
    assert len(summary["members"]) == 1 and summary["members"][0]["stop_reason"] == "budget"
    model, saved, _ = load_model(out)
    assert saved["members"] == 1 and not hasattr(model, "members")
    assert predict.run(out, texts=["a good movie"])[0]["label"] in ("neg", "pos")


def test_a_resumed_ensemble_keeps_its_finished_members(toy, tmp_path):
    train, dev = toy
    out = tmp_path / "run"
    first = ensemble.run(config(train, dev, max_steps=6, members="2"), out, quiet=True)
    member_weights = out / "members" / "0" / "model.safetensors"
    stamp = member_weights.stat().st_mtime_ns
    (out / "members" / "1" / "summary.json").unlink()  # the second member never finished
    again = ensemble.run(config(train, dev, max_steps=6, members="2", resume="auto"), out, quiet=True)
    assert member_weights.stat().st_mtime_ns == stamp
    assert again["best_val_accuracy"] == first["best_val_accuracy"]
    # a fresh start clears the members of an older run
    (out / "members" / "7").mkdir()
    ensemble.run(config(train, dev, max_steps=2, members="2"), out, quiet=True)
    assert sorted(p.name for p in (out / "members").iterdir()) == ["0", "1"]


@pytest.mark.parametrize("overrides, fragment", [
    ({"members": "two"}, "--members 'two'"),
    ({"members": "0"}, "--members '0'"),
    ({"members": "2", "resume": "some/checkpoint"}, "--resume auto"),
])
def test_bad_member_flags_are_one_clear_line(toy, tmp_path, overrides, fragment):
    train, dev = toy
    with pytest.raises(UserError) as caught:
        ensemble.run(config(train, dev, **overrides), tmp_path / "run", quiet=True)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)
