"""The BERT and T5 architectures end to end: pretrain, fill / generate, compare's objectives, finetune."""

import json

import pytest

from budgetlm.cli import SECTIONS, build_parser, main
from budgetlm.config import FinetuneConfig, RunConfig, resolve
from budgetlm.errors import UserError
from budgetlm.workflows import compare, fill, finetune, predict
from tests.workflows.test_finetune import toy_rows, write_tsv

TINY = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--context", "48", "--micro-batch", "8",
        "--vocab-size", "300", "--compile", "off", "--quiet", "--eval-every", "15", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, play_text):
    """A BERT and a T5 pretrained for 30 steps on a play (one module's worth of fixtures: ~6 s)."""
    folder = tmp_path_factory.mktemp("archs")
    data = folder / "play.txt"
    data.write_text(play_text)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BUDGETLM_CACHE", str(folder / "cache"))
        for arch in ("bert", "t5"):
            assert main(["pretrain", "--arch", arch, "--data", str(data), "--max-steps", "30", "--out",
                         str(folder / arch), *TINY]) == 0
    return folder


@pytest.mark.parametrize("arch, objective, accuracy", [("bert", "masked_lm", "val_mlm_accuracy"),
                                                        ("t5", "span_corruption", "val_span_accuracy")])
def test_pretraining_writes_its_objective_and_its_own_validation_figure(runs, arch, objective, accuracy):
    s = json.loads((runs / arch / "summary.json").read_text())
    assert s["objective"] == objective and s["model"]["arch"] == arch
    assert "best_val_bpb" not in s and 0 <= s[accuracy] <= 1  # bits per byte are not defined for this objective
    evals = [json.loads(line) for line in (runs / arch / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    assert s["val_loss"] == s["best_val_loss"] < evals[0]["val_loss"] - 0.5
    assert "val_bpb" not in evals[-1]


@pytest.mark.parametrize("arch", ["bert", "t5"])
def test_tokens_seen_and_flops_count_the_text_read_not_only_the_tokens_that_carry_a_loss(runs, arch):
    s = json.loads((runs / arch / "summary.json").read_text())
    batch = json.loads((runs / arch / "plan.json").read_text())["training"]["batch_tokens"]
    assert s["tokens_seen"] == s["steps"] * batch  # whole windows of 48; a BERT masks a quarter, a T5 drops 15%
    assert s["flops"] == pytest.approx(s["tokens_seen"] * s["flops_per_token"])
    assert s["model_flops_per_s"] == pytest.approx(s["tokens_per_s"] * s["flops_per_token"], rel=1e-3)
    tokenizer = json.loads((runs / arch / "tokenizer.json").read_text())
    specials = {t["content"] for t in tokenizer["added_tokens"]}
    assert ({"[MASK]", "[CLS]", "[SEP]", "[PAD]"} if arch == "bert" else {"[PAD]", "<extra_id_0>", "<extra_id_99>"}) <= specials


def test_fill_prints_the_top_predictions_of_each_mask(runs, capsys):
    assert main(["fill", "--model", str(runs / "bert"), "--text", "the [MASK] of [MASK] sat", "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[MASK] 1: ") and lines[1].startswith("[MASK] 2: ") and len(lines) == 3
    assert lines[0].count("'") >= 6 and "[MASK]" not in lines[2]


def test_fill_wants_a_mask_and_a_bert(runs):
    with pytest.raises(UserError, match=r"no \[MASK\]"):
        fill.run(runs / "bert", "no masks here")
    with pytest.raises(UserError, match="cannot fill masks"):
        fill.run(runs / "t5", "a [MASK]")


def test_generate_fills_a_t5_prompts_sentinels(runs, capfd):
    assert main(["generate", "--model", str(runs / "t5"), "--prompt", "To be <extra_id_0> not <extra_id_1>.",
                 "--max-new-tokens", "12", "--temperature", "0"]) == 0
    out = capfd.readouterr().out
    assert out.startswith("To be ") and "<extra_id_" not in out and " not " in out


def test_compare_refuses_to_rank_different_objectives_unless_told(tmp_path):
    flags = vars(build_parser().parse_args(["pretrain", "--max-steps", "2", *TINY]))
    base = resolve(RunConfig, SECTIONS, None, flags)
    mixed = compare.variants(base, vary=["arch=gpt,bert"])
    with pytest.raises(UserError, match="different objectives"):
        compare.run(base, mixed, tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()  # refused before any run
    assert compare.ranking_metric(mixed, "val_loss") == "val_loss"
    with pytest.raises(UserError, match="val_bpb"):
        compare.ranking_metric(mixed, "val_bpb")
    assert compare.ranking_metric(compare.variants(base, vary=["lr=1e-3,1e-2"]), None) == "val_bpb"
    assert compare.ranking_metric(compare.variants(base, vary=["arch=bert", "lr=1e-3,1e-2"]), None) == "val_loss"


@pytest.mark.parametrize("arch", ["bert", "t5"])
def test_finetune_starts_from_a_pretrained_encoder(runs, tmp_path, arch):
    train, dev = write_tsv(tmp_path / "train.tsv", toy_rows(200, 0)), write_tsv(tmp_path / "dev.tsv", toy_rows(60, 1))
    cfg = FinetuneConfig(model=str(runs / arch), data=str(train), val=str(dev), text_column="sentence",
                         max_steps=25, threads=1, members=1, lr=3e-3)
    summary = finetune.run(cfg, tmp_path / "ft", quiet=True)
    assert summary["body"] == arch and summary["best_val_accuracy"] >= 0.8
    assert summary["settings"]["ema"] == finetune.EMA_DECAY  # a budgetlm encoder averages its weights, as a GPT does
    # the saved classifier rebuilds (the encoder alone for a T5) and predicts as it was scored, padding and all
    predict.run(tmp_path / "ft", data=dev, out=tmp_path / "preds.jsonl")
    preds = [json.loads(line)["label"] for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    truth = [label for _, label in toy_rows(60, 1)]
    assert sum(p == t for p, t in zip(preds, truth)) / len(truth) == summary["best_val_accuracy"]


@pytest.mark.parametrize("arch, cls", [("bert", "BudgetLMForMaskedLM"), ("t5", "BudgetLMForSeq2SeqLM")])
def test_a_pretrained_bert_or_t5_exports_as_custom_code_and_comes_back(runs, tmp_path, arch, cls):
    from budgetlm.train.checkpoint import load_model
    from budgetlm.workflows import export, import_

    export.run(str(runs / arch), tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [cls]
    assert (tmp_path / "hf" / "modeling_budgetlm.py").is_file()
    import_.run(f"hf:{tmp_path / 'hf'}", tmp_path / "back")
    (ours, _, _), (back, back_config, _) = load_model(runs / arch), load_model(tmp_path / "back")
    assert back_config["arch"] == arch and back.config == ours.config
    assert all(back.state_dict()[k].equal(v) for k, v in ours.state_dict().items())


def test_tune_ranks_a_t5_by_its_loss_and_refuses_to_vary_arch(play_file, tmp_path):
    from budgetlm.workflows import tune

    flags = ["pretrain", "--arch", "t5", "--data", str(play_file), "--max-steps", "4", *TINY]
    base = resolve(RunConfig, SECTIONS, None, vars(build_parser().parse_args(flags)))
    found = tune.run(base, tune.parse_space({"lr": [1e-4, 1e-2]}, base), tmp_path / "tune", trials=2)
    losses = [t["best_val_loss"] for t in found["trials"]]
    assert all(t["best_val_bpb"] is None and t["state"] == "complete" for t in found["trials"])
    assert found["best_val_loss"] == min(losses) and found["trials"][found["best_trial"]]["best_val_loss"] == min(losses)
    assert "| best val_loss |" in (tmp_path / "tune" / "trials.md").read_text()
    gpt = resolve(RunConfig, SECTIONS, None, vars(build_parser().parse_args(["pretrain", *TINY])))
    with pytest.raises(UserError, match="varies arch"):
        tune.run(gpt, tune.parse_space({"arch": ["gpt", "bert"]}, gpt), tmp_path / "tune2", trials=1,
                 trial_budget="10s")
    assert not (tmp_path / "tune2").exists()


@pytest.mark.parametrize("arch", ["bert", "t5"])
def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights(play_file, tmp_path, arch, capfd):
    import shutil

    from safetensors.torch import load_file

    flags = ["pretrain", "--arch", arch, "--data", str(play_file), "--max-steps", "8", "--save-every", "4",
             "--keep-checkpoints", "3", "--dropout", "0.1", *[f for f in TINY if f != "--quiet"]]
    assert main([*flags, "--out", str(tmp_path / "ref")]) == 0
    # the run as it stood after its checkpoint at step 4: the later checkpoint and the final files gone
    shutil.copytree(tmp_path / "ref", tmp_path / "resumed")
    for later in (tmp_path / "resumed" / "checkpoints").glob("step-*"):
        if later.name != "step-00000004":
            shutil.rmtree(later)
    for name in ("model.safetensors", "summary.json"):
        (tmp_path / "resumed" / name).unlink()
    capfd.readouterr()
    assert main([*flags, "--out", str(tmp_path / "resumed"), "--resume", "auto"]) == 0
    assert "step-00000004 (step 4" in capfd.readouterr().err
    ref, resumed = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("ref", "resumed"))
    assert ref.keys() == resumed.keys() and all(ref[k].equal(resumed[k]) for k in ref)


def test_runs_lists_each_objectives_loss_apart(runs, capsys):
    from budgetlm.workflows import runs as listing

    rows = listing.run(runs)
    by_name = {r["name"]: r for r in rows}
    assert by_name["bert"]["metric"] == "masked_lm val_loss" and by_name["t5"]["metric"] == "span_corruption val_loss"
    assert by_name["bert"]["arch"] == "bert 1×32"
    assert "masked_lm val_loss" in capsys.readouterr().out
