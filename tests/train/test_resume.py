"""Crash safety: killed runs resume exactly; damaged checkpoints are skipped; signals save and stop."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from budgetlm.cli import main
from budgetlm.train.resume import Checkpoints

TINY = ["--n-layer", "2", "--d-model", "64", "--n-head", "2", "--context", "64", "--micro-batch", "4",
        "--vocab-size", "400", "--compile", "off", "--threads", "1", "--dropout", "0.1", "--seed", "5"]


def arguments(data, out, *extra):
    return ["--data", str(data), "--out", str(out), *TINY, *extra]


def command(data, out, *extra):
    """A pretrain process, for the tests that kill or signal it."""
    return [sys.executable, "-m", "budgetlm", "pretrain", *arguments(data, out, *extra)]


def pretrain(data, out, *extra) -> int:
    """pretrain in this process, with no interpreter start-up to wait for."""
    return main(["pretrain", *arguments(data, out, *extra)])


def same_weights(a, b) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


def newest_checkpoint_step(out) -> int:
    steps = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*") if p.name.split("-")[1].isdigit()]
    return max(steps, default=-1)


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "BUDGETLM_CACHE": str(tmp_path / "cache")}


def test_killed_three_times_and_resumed_ends_bitwise_equal(play_file, tmp_path, env):
    steps = ["--max-steps", "150", "--save-every", "10"]
    subprocess.run(command(play_file, tmp_path / "ref", *steps), env=env, check=True, capture_output=True)
    rng = random.Random(0)
    out = tmp_path / "killed"
    kills = 0
    for _ in range(3):
        # Kill at a random moment after the run has made progress (a new checkpoint), however slow
        # the machine: the moment falls anywhere in a step, a save or an evaluation.
        saved_before = newest_checkpoint_step(out)
        proc = subprocess.Popen(command(play_file, out, *steps, "--resume", "auto"), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and newest_checkpoint_step(out) <= saved_before:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2, "the runs finished before they could be killed; the test proves nothing"
    done = subprocess.run(command(play_file, out, *steps, "--resume", "auto"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    assert same_weights(tmp_path / "ref" / "model.safetensors", out / "model.safetensors")
    ref_summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == ref_summary["steps"] == 150
    assert summary["best_val_loss"] == ref_summary["best_val_loss"]
    steps_logged = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()
                    if json.loads(l)["kind"] == "eval"]
    assert steps_logged == sorted(set(steps_logged)), "a resumed run must not log an evaluation twice"


def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(play_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain(play_file, out, "--max-steps", "30", "--save-every", "10", "--keep-checkpoints", "3") == 0
    checkpoints = Checkpoints(out / "checkpoints").all()
    assert [p.name for p in checkpoints] == ["step-00000010", "step-00000020", "step-00000030"]
    weights = checkpoints[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncate the newest
    capsys.readouterr()
    assert pretrain(play_file, out, "--max-steps", "30", "--save-every", "10", "--resume", "auto") == 0
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step-00000030" in err
    assert "resuming from" in err and "step-00000020" in err


def test_resume_auto_without_checkpoints_starts_fresh(play_file, tmp_path, capsys):
    assert pretrain(play_file, tmp_path / "new", "--max-steps", "3", "--resume", "auto") == 0
    assert "resuming" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def ten_steps(play_text, tmp_path_factory):
    """A run of 10 steps, checkpointed at 5 and 10, that the refusals below try to resume with other flags
    (a refused run changes nothing in it)."""
    folder = tmp_path_factory.mktemp("ten_steps")
    (folder / "play.txt").write_text(play_text, encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BUDGETLM_CACHE", str(folder / "cache"))
        assert pretrain(folder / "play.txt", folder / "run", "--max-steps", "10", "--save-every", "5") == 0
    return folder


@pytest.mark.parametrize("old, new, refusal", [
    ("64", "96", "belongs to another model"),        # --d-model
    ("400", "300", "not --vocab-size 300"),          # --vocab-size
])
def test_resuming_with_another_model_or_vocabulary_is_refused(ten_steps, capsys, old, new, refusal):
    changed = [a if a != old else new for a in arguments(ten_steps / "play.txt", ten_steps / "run", "--max-steps",
                                                          "20", "--resume", "auto")]
    assert main(["pretrain", *changed]) == 2  # a UserError: one line, no traceback
    assert refusal in capsys.readouterr().err.splitlines()[-1]


def test_sigint_finishes_the_step_saves_and_says_how_to_resume(play_file, tmp_path, env):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(play_file, out, "--budget", "2m"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "--resume auto" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted"
    assert Checkpoints(out / "checkpoints").latest_valid() is not None
    assert (out / "model.safetensors").exists()


def test_a_full_disk_while_saving_is_one_clear_error(tmp_path, monkeypatch):
    import torch

    from budgetlm.errors import UserError
    from budgetlm.train import checkpoint

    def full(*args, **kwargs):  # how safetensors reports ENOSPC
        raise checkpoint.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_weights({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == [], "no temporary file is left behind"
    with pytest.raises(UserError, match="could not save the model .* free space"):
        checkpoint.save_model(tmp_path / "out", torch.nn.Linear(2, 2), {}, None)


def test_resuming_with_another_bpe_dropout_is_refused(play_file, tmp_path, capsys):
    out = tmp_path / "run"
    bpe = ["--bpe-dropout", "0.1", "--bpe-passes", "2"]
    assert pretrain(play_file, out, "--max-steps", "10", "--save-every", "5", *bpe) == 0
    capsys.readouterr()
    assert pretrain(play_file, out, "--max-steps", "20", "--resume", "auto", "--bpe-dropout", "0.2",
                    "--bpe-passes", "2") == 2  # a UserError: one line, no traceback
    assert "BPE-dropout 0.1 over 2 passes, not 0.2 over 2" in capsys.readouterr().err.splitlines()[-1]
    assert pretrain(play_file, out, "--max-steps", "20", "--resume", "auto", *bpe) == 0
    err = capsys.readouterr().err
    assert "resuming from" in err
    assert "no longer cached" not in err and "re-segmented" not in err


def test_a_resumed_planned_run_keeps_its_first_plan(play_file, tmp_path, monkeypatch):
    """The plan is made once for the whole budget: a resume, with less time left, must not plan
    again (another shape could not continue the checkpoint)."""
    from budgetlm import pretraining
    from budgetlm.cli import main

    out = tmp_path / "run"
    planned = ["pretrain", "--data", str(play_file), "--out", str(out), "--budget", "2m", "--vocab-size", "400",
               "--compile", "off", "--threads", "1", "--quiet", "--save-every", "3"]
    assert main([*planned, "--max-steps", "3"]) == 0
    first = json.loads((out / "summary.json").read_text())

    def plan_again(*args, **kwargs):
        raise AssertionError("a resumed run planned again")

    monkeypatch.setattr(pretraining, "plan_on_device", plan_again)
    assert main([*planned, "--max-steps", "6", "--resume", "auto"]) == 0
    resumed = json.loads((out / "summary.json").read_text())
    shape = lambda summary: {k: v for k, v in summary["model"].items() if k != "temperature"}  # fitted per run
    assert resumed["steps"] == 6 and shape(resumed) == shape(first)
