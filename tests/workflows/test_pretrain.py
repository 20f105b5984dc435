import json
import math
import shutil
import time

import pytest

from budgetlm.cli import main
from budgetlm.data.sources import split_validation
from budgetlm.data.tokens import cache_dir

TINY = ["--n-layer", "2", "--d-model", "64", "--n-head", "2", "--context", "64", "--micro-batch", "8",
        "--vocab-size", "512", "--compile", "off", "--quiet"]


def read_summary(out):
    return json.loads((out / "summary.json").read_text())


def test_short_run_lowers_validation_loss(play_file, tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(play_file), "--max-steps", "60", "--out", str(out), *TINY]) == 0
    s = read_summary(out)
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[0]["step"] == 0
    assert s["best_val_loss"] < evals[0]["val_loss"] - 1.0
    assert s["stop_reason"] == "max_steps" and s["steps"] == 60
    assert s["model"]["canon"] == 0 and s["ema"] == 0  # no plan: neither Canon layers nor a moving average
    # the run's speed is kept with its shape, for the next run's compile decision (train/compile.py)
    (record,) = [json.loads(p.read_text()) for p in (cache_dir() / "compile").rglob("record.json")]
    assert s["compile_decision"] == "eager (--compile off)" and record["tokens_per_s"] == {"eager": s["tokens_per_s"]}
    assert s["tokens_seen"] == 60 * 8 * 64
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl", "loss.png"):
        assert (out / name).stat().st_size > 0
    for key in ("best_val_bpb", "best_val_loss", "tokens_seen", "params", "wall_s", "budget_s", "tokens_per_s",
                "device", "precision", "stop_reason"):
        assert key in s
    train = [r for r in records if r["kind"] == "train"]
    assert {"step", "tokens", "elapsed_s", "lr", "train_loss", "tokens_per_s"} <= set(train[0])
    assert {"step", "tokens", "elapsed_s", "val_loss", "val_bpb"} <= set(evals[0])


def printed(capsys, *args: str) -> str:
    """What the command `budgetlm ARGS` prints to stdout, run in this process (no interpreter start-up)."""
    capsys.readouterr()
    assert main(list(args)) == 0
    return capsys.readouterr().out


def run_eval(capsys, model, data) -> dict:
    return json.loads(printed(capsys, "eval", "--model", str(model), "--data", str(data)))


def test_reported_bpb_is_the_saved_models_nats_per_validation_byte(play_file, tmp_path, capsys):
    """`eval` of the saved model on the validation text alone follows the definition, total nats ÷ (UTF-8 bytes ×
    ln 2), and at temperature 1 reproduces uncalibrated_val_bpb; best_val_bpb is the calibrated model's figure,
    cross-fitted, so the saved model, whose temperature was fitted on all of that text, reads at most that."""
    out = tmp_path / "run"
    main(["pretrain", "--data", str(play_file), "--max-steps", "10", "--out", str(out), *TINY])
    s = read_summary(out)
    _, (val_text,) = split_validation([play_file.read_text()], 0.1)
    (tmp_path / "val.txt").write_text(val_text)
    result = run_eval(capsys, out, tmp_path / "val.txt")
    assert result["bytes"] == len(val_text.encode())
    assert result["bpb"] == pytest.approx(result["loss"] * result["tokens"] / (result["bytes"] * math.log(2)), rel=1e-9)
    assert json.loads((out / "config.json").read_text())["temperature"] == s["temperature"]
    assert result["bpb"] <= s["best_val_bpb"] * (1 + 1e-4) and s["best_val_bpb"] <= s["uncalibrated_val_bpb"]
    raw = tmp_path / "raw"
    shutil.copytree(out, raw)
    config = json.loads((raw / "config.json").read_text())
    (raw / "config.json").write_text(json.dumps({**config, "temperature": 1.0}))
    assert run_eval(capsys, raw, tmp_path / "val.txt")["bpb"] == pytest.approx(s["uncalibrated_val_bpb"], rel=1e-4)


def test_without_calibration_the_reported_bpb_is_the_raw_models(play_file, tmp_path, capsys):
    out = tmp_path / "run"
    main(["pretrain", "--data", str(play_file), "--max-steps", "10", "--no-calibrate", "--out", str(out), *TINY])
    s = read_summary(out)
    assert s["temperature"] == 1.0 and s["best_val_bpb"] == s["uncalibrated_val_bpb"]
    _, (val_text,) = split_validation([play_file.read_text()], 0.1)
    (tmp_path / "val.txt").write_text(val_text)
    assert run_eval(capsys, out, tmp_path / "val.txt")["bpb"] == pytest.approx(s["best_val_bpb"], rel=1e-4)


def test_budget_stops_the_run_on_time(play_file, tmp_path):
    out = tmp_path / "run"
    started = time.monotonic()
    assert main(["pretrain", "--data", str(play_file), "--budget", "20s", "--out", str(out), *TINY]) == 0
    wall = time.monotonic() - started
    s = read_summary(out)
    assert s["stop_reason"] == "budget"
    assert s["wall_s"] <= 20 * 1.03
    assert wall <= 20 * 1.03 + 1.0  # the summary's clock and the outside clock agree
    assert s["steps"] > 10


def test_a_batch_smaller_than_a_micro_batch_is_the_batch_asked_for(play_file, tmp_path):
    out = tmp_path / "run"
    small = [a for a in TINY if a not in ("--micro-batch", "8")]
    main(["pretrain", "--data", str(play_file), "--max-steps", "3", "--batch-tokens", "128", "--out", str(out), *small])
    assert read_summary(out)["tokens_seen"] == 3 * 128  # two sequences of 64 per step, not the default eight


def test_seeded_runs_repeat(play_file, tmp_path):
    for name in ("a", "b"):
        main(["pretrain", "--data", str(play_file), "--max-steps", "8", "--seed", "3", "--out", str(tmp_path / name), *TINY])
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_the_kept_weights_are_a_moving_average_when_asked(play_file, tmp_path):
    for name, flags in (("averaged", ["--ema", "0.998"]), ("raw", []), ("raw-asked", ["--ema", "0"])):
        main(["pretrain", "--data", str(play_file), "--max-steps", "30", "--seed", "3", "--out", str(tmp_path / name),
              *TINY, *flags])
    assert read_summary(tmp_path / "averaged")["ema"] == 0.998 and read_summary(tmp_path / "raw")["ema"] == 0.0
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in ("averaged", "raw", "raw-asked")}
    assert weights["averaged"] != weights["raw"] == weights["raw-asked"]


def test_a_planned_run_on_a_repeated_text_regularizes_and_calibrates(play_text, tmp_path, capsys):
    """A tenth of the play is tiny: 10 seconds read it many times, so the plan adds dropout, Canon layers and a
    moving average of the weights, and the fitted temperature pays."""
    data, out = tmp_path / "tenth.txt", tmp_path / "run"
    data.write_text(play_text[: len(play_text) // 10])
    main(["pretrain", "--data", str(data), "--budget", "10s", "--vocab-size", "512", "--compile", "off",
          "--out", str(out)])
    s = read_summary(out)
    assert s["ema"] == 0.998 and s["model"]["canon"] == 4 and s["model"]["dropout"] == 0.1
    # many epochs make a model overconfident: the temperature fitted on held-out text is above 1 and pays
    assert s["temperature"] > 1 and s["best_val_bpb"] < s["uncalibrated_val_bpb"]
    err = capsys.readouterr().err
    assert "dropout 0.1" in err and "moving average 0.998" in err and "Canon layers 4" in err


def test_bpe_dropout_trains_on_respelled_text_and_repeats_per_seed(play_file, tmp_path, capsys):
    bpe = ["--bpe-dropout", "0.1", "--bpe-passes", "2", "--max-steps", "12", "--seed", "3"]
    main(["pretrain", "--data", str(play_file), "--out", str(tmp_path / "a"), *[a for a in TINY if a != "--quiet"], *bpe])
    assert "re-segmented the training text 2 times with BPE-dropout 0.1" in capsys.readouterr().err
    main(["pretrain", "--data", str(play_file), "--out", str(tmp_path / "b"), *TINY, *bpe])
    a = read_summary(tmp_path / "a")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a["bpe_dropout"] == 0.1 and a["bpe_passes"] == 2
    # epochs count the text, not its three spellings: 12 steps of 512 tokens over the training tokens
    text_tokens = a["tokens_seen"] / a["epochs"]
    main(["pretrain", "--data", str(play_file), "--out", str(tmp_path / "c"), *TINY, "--max-steps", "12"])
    c = read_summary(tmp_path / "c")
    assert text_tokens == pytest.approx(c["tokens_seen"] / c["epochs"], rel=1e-3)
    assert a["best_val_loss"] != c["best_val_loss"]


def test_generate_prints_the_prompt_and_its_continuation(play_file, tmp_path, capsys):
    out = tmp_path / "run"
    main(["pretrain", "--data", str(play_file), "--max-steps", "20", "--out", str(out), *TINY])
    run = lambda *extra: printed(capsys, "generate", "--model", str(out), "--prompt", "HAMLET.", "--max-new-tokens",
                                 "20", *extra)
    greedy = run("--temperature", "0")
    assert greedy.startswith("HAMLET.") and len(greedy) > len("HAMLET.") + 5
    assert greedy == run("--temperature", "0", "--seed", "9")   # greedy ignores the seed
    assert run("--seed", "1") == run("--seed", "1")
    assert run("--seed", "1") != run("--seed", "2")
    for precision in ("fp32", "bf16"):  # weights cast for decoding (bf16 is emulated, slowly, on older CPUs)
        assert run("--temperature", "0", "--precision", precision).startswith("HAMLET.")


def test_eval_command_reports_loss_bpb_and_perplexity(play_file, tmp_path, capsys):
    out = tmp_path / "run"
    main(["pretrain", "--data", str(play_file), "--max-steps", "5", "--out", str(out), *TINY])
    result = run_eval(capsys, out, play_file)
    assert {"loss", "bpb", "ppl"} <= set(result)
    assert result["bytes"] == len(play_file.read_bytes())


def test_the_curve_ends_at_the_reported_figure_and_the_sample_agrees_with_the_full_evaluation(play_file, tmp_path,
                                                                                               monkeypatch):
    """Evaluations during training score a fixed sample (with its standard error); the final record is
    the whole split with the reported, calibrated figure, and loss.png's legend shows it."""
    from tests.conftest import SavedFigures

    figures = SavedFigures(monkeypatch)
    out = tmp_path / "run"
    main(["pretrain", "--data", str(play_file), "--max-steps", "40", "--eval-every", "10", "--eval-tokens", "2048",
          "--out", str(out), *TINY])
    s = read_summary(out)
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    (final,) = [r for r in records if r["kind"] == "final"]
    assert all(0 < e["val_sample_tokens"] <= 2048 and not e["val_full"] and e["val_bpb_se"] > 0 for e in evals)
    assert final["val_full"] and final["val_bpb"] == pytest.approx(s["best_val_bpb"], abs=1e-6)
    kept = next(e for e in evals if e["step"] == final["best_step"])
    assert abs(kept["val_bpb"] - s["uncalibrated_val_bpb"]) <= 2 * kept["val_bpb_se"]
    assert figures.labelled("final, whole validation set", f"{s['best_val_bpb']:.4f} bits/byte")
