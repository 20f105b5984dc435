"""Distributed training: 2 processes under torchrun (gloo on CPU) end where 1 process ends, resume after
a SIGKILL in 1 or 2 processes, and stop on time together when one rank is slower."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from budgetlm.cli import main

TORCHRUN = Path(sys.executable).parent / "torchrun"
pytestmark = pytest.mark.skipif(not TORCHRUN.exists() or not Path("/proc").is_dir(),
                                reason="needs torchrun beside the Python interpreter and Linux's /proc")

STEPS = 20
TINY = ["--n-layer", "2", "--d-model", "64", "--n-head", "2", "--context", "64", "--vocab-size", "512",
        "--batch-tokens", "1024", "--micro-batch", "4", "--precision", "fp32", "--compile", "off", "--no-calibrate",
        "--seed", "3", "--lr", "5e-4", "--quiet"]
CACHE: dict[str, str] = {}  # the module's token cache, shared by its runs (tokenized once)


def pretrain(data: Path, limit: list[str]) -> list[str]:
    return ["pretrain", "--data", str(data), *limit, *TINY]


def torchrun(args: list[str], *, nproc: int = 2, timeout: float = 120, env: dict | None = None,
             wait: bool = True):
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(nproc), "-m", "budgetlm", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **CACHE, **(env or {})}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    try:
        said, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in processes_of(Path(args[args.index("--out") + 1])):
            os.kill(pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, said[-3000:]
    return proc, said


def max_diff(a: Path, b: Path) -> float:
    one, two = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(one) == set(two)
    return max((one[k] - two[k]).abs().max().item() for k in one)


def first_grad_norm(run: Path) -> float:
    """Step 1's gradient norm: Adam and Muon hardly see a gradient's scale, so the weights alone would miss
    gradients summed over the ranks where they should be averaged."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r["grad_norm"] for r in records if r["kind"] == "train" and r["step"] == 1)


def processes_of(out: Path) -> list[int]:
    """The live processes with `out` among their arguments: torchrun and its workers (each in a session of
    its own, so a process group does not hold them all)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(out).encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # ended meanwhile
            continue
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory, play_text):
    """The same 20-step run in 1 process and in 2 (DDP, FSDP with AdamW and with Muon)."""
    root = tmp_path_factory.mktemp("dist")
    data = root / "play.txt"
    data.write_text(play_text)
    CACHE["BUDGETLM_CACHE"] = str(root / "cache")
    common = pretrain(data, ["--max-steps", str(STEPS), "--eval-every", str(STEPS)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BUDGETLM_CACHE", CACHE["BUDGETLM_CACHE"])
        for optim in ("adamw", "muon"):
            assert main([*common, "--optim", optim, "--out", str(root / f"one-{optim}")]) == 0
    for name, args in (("ddp-adamw", ["--strategy", "ddp", "--optim", "adamw"]),
                       ("fsdp-adamw", ["--strategy", "fsdp", "--optim", "adamw", "--save-every", "5"]),
                       ("fsdp-muon", ["--strategy", "fsdp", "--optim", "muon"])):
        torchrun([*common, *args, "--out", str(root / name)])
    return root, data, common


def test_ddp_two_processes_end_where_one_ends(runs):
    root, _, _ = runs
    assert max_diff(root / "one-adamw", root / "ddp-adamw") <= 1e-5
    assert first_grad_norm(root / "ddp-adamw") == pytest.approx(first_grad_norm(root / "one-adamw"), rel=1e-5)
    s = json.loads((root / "ddp-adamw" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["strategy"] == "ddp" and s["steps"] == STEPS
    assert s["tokens_seen"] == STEPS * 1024  # the global batch, not one rank's share
    records = [json.loads(line) for line in (root / "ddp-adamw" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, STEPS]  # one writer: no duplicates
    # the validation windows split over the ranks and summed: one process's figures for the same weights
    first = next(json.loads(line) for line in (root / "one-adamw" / "metrics.jsonl").read_text().splitlines())
    assert evals[0]["val_tokens"] == first["val_tokens"]
    assert evals[0]["val_loss"] == pytest.approx(first["val_loss"], rel=1e-6)


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_fsdp_two_processes_end_where_one_ends(runs, optim):
    root, _, _ = runs
    assert max_diff(root / f"one-{optim}", root / f"fsdp-{optim}") <= 1e-4
    assert first_grad_norm(root / f"fsdp-{optim}") == pytest.approx(first_grad_norm(root / f"one-{optim}"), rel=1e-5)
    assert json.loads((root / f"fsdp-{optim}" / "summary.json").read_text())["strategy"] == "fsdp"


def test_fsdp_killed_run_resumes_in_one_and_in_two_processes(runs, tmp_path, monkeypatch, capsys):
    """SIGKILL to the whole job after its first checkpoint; the run resumed with 2 processes, and with 1,
    ends where the uninterrupted 2-process run ended."""
    root, _, common = runs
    monkeypatch.setenv("BUDGETLM_CACHE", CACHE["BUDGETLM_CACHE"])
    out = tmp_path / "killed"
    args = [*common, "--strategy", "fsdp", "--optim", "adamw", "--save-every", "5", "--out", str(out)]
    proc = torchrun(args, wait=False, env={"BUDGETLM_TEST_SLOW_RANK": "1:0.3"})
    deadline = time.monotonic() + 90
    while not list((out / "checkpoints").glob("step-*")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    for pid in processes_of(out):  # the whole job at once, as a lost machine
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    while processes_of(out):
        time.sleep(0.05)
    assert not (out / "model.safetensors").exists()
    saved = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert saved and saved[-1] < f"step-{STEPS:08d}"
    one = tmp_path / "killed-one"
    subprocess.run(["cp", "-r", str(out), str(one)], check=True)

    _, said = torchrun([*args, "--resume", "auto"])
    assert f"resuming from {out / 'checkpoints' / saved[-1]}" in said
    assert max_diff(root / "fsdp-adamw", out) <= 1e-5
    # in one process, without torchrun: the sharded checkpoint read whole
    assert main([*common, "--optim", "adamw", "--resume", "auto", "--out", str(one)]) == 0
    assert f"resuming from {one / 'checkpoints' / saved[-1]}" in capsys.readouterr().err
    assert max_diff(root / "fsdp-adamw", one) <= 1e-5
    assert json.loads((one / "summary.json").read_text())["steps"] == STEPS


def test_slow_rank_stops_on_time_with_the_others(runs, tmp_path):
    """A time budget with rank 1 slower each step: rank 0 decides the stop for both, both exit cleanly
    within the budget and its reserve, and torchrun leaves no process behind."""
    _, data, _ = runs
    budget, out = 8, tmp_path / "timed"
    started = time.monotonic()
    torchrun([*pretrain(data, []), "--budget", f"{budget}s", "--optim", "adamw", "--out", str(out)],
             env={"BUDGETLM_TEST_SLOW_RANK": "1:0.05"}, timeout=60)
    took = time.monotonic() - started
    s = json.loads((out / "summary.json").read_text())
    assert s["stop_reason"] == "budget" and s["world_size"] == 2
    assert s["wall_s"] <= budget + 2
    assert took <= budget + 15  # torchrun and two interpreters starting, on a shared 2-core machine
    assert processes_of(out) == []


def test_commands_other_than_pretrain_and_finetune_refuse_torchrun(monkeypatch, capsys):
    """Under torchrun every process would run the whole command and write the same --out."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["generate", "--model", "nowhere", "--prompt", "x"]) == 2
    assert "only pretrain and finetune run under torchrun" in capsys.readouterr().err


def test_ddp_with_ema_and_l1_ends_where_one_process_ends(play_text, tmp_path, monkeypatch):
    """The moving average is updated alike on every rank, and the L1 penalty's gradient (the same on every
    rank, in the gradients before their all-reduce) is averaged with the rest: one process's weights. A
    penalty counted once per rank, or an average drifting apart, would end elsewhere."""
    data = tmp_path / "play.txt"
    data.write_text(play_text)
    cache = {"BUDGETLM_CACHE": str(tmp_path / "cache")}
    monkeypatch.setenv("BUDGETLM_CACHE", cache["BUDGETLM_CACHE"])
    common = [*pretrain(data, ["--max-steps", "10", "--eval-every", "10"]), "--optim", "adamw", "--ema", "0.9",
              "--l1", "1e-2"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    torchrun([*common, "--strategy", "ddp", "--out", str(tmp_path / "two")], env=cache)
    assert max_diff(tmp_path / "one", tmp_path / "two") <= 1e-5
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s["ema"] == 0.9 and s["world_size"] == 2 and s["config"]["train"]["l1"] == 1e-2
