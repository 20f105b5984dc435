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
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="no torchrun beside the Python interpreter")

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
    # a session of its own, so that the test can end the whole group (torchrun and its workers) at once
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    if not wait:
        return proc
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, out[-3000:]
    return proc, out


def max_diff(a: Path, b: Path) -> float:
    one, two = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(one) == set(two)
    return max((one[k] - two[k]).abs().max().item() for k in one)


def first_grad_norm(run: Path) -> float:
    """Step 1's gradient norm: Adam and Muon hardly see a gradient's scale, so the weights alone would miss
    gradients summed over the ranks where they should be averaged."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r["grad_norm"] for r in records if r["kind"] == "train" and r["step"] == 1)


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


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
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, STEPS]  # one writer: no duplicates


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
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
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
    budget = 8
    started = time.monotonic()
    proc, _ = torchrun([*pretrain(data, []), "--budget", f"{budget}s", "--optim", "adamw", "--out", str(tmp_path / "timed")],
                    env={"BUDGETLM_TEST_SLOW_RANK": "1:0.05"}, timeout=60)
    took = time.monotonic() - started
    s = json.loads((tmp_path / "timed" / "summary.json").read_text())
    assert s["stop_reason"] == "budget" and s["world_size"] == 2
    assert s["wall_s"] <= budget + 2
    assert took <= budget + 15  # torchrun and two interpreters starting, on a shared 2-core machine
    assert group_gone(proc.pid)


def test_commands_other_than_pretrain_refuse_torchrun(monkeypatch, capsys):
    """Under torchrun every process would run the whole command and write the same --out."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["generate", "--model", "nowhere", "--prompt", "x"]) == 2
    assert "only pretrain runs under torchrun" in capsys.readouterr().err
