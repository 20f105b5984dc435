"""Training throughput and memory of one process against several on this machine, at the reference shape.

    .venv/bin/python bench/distributed.py [--steps 30] [--data ../shared/data/tinyshakespeare/input.txt]

Runs the same step-limited pretraining (6 layers, d_model 384, context 256, vocab 8192, micro-batch 8, fp32,
eager, no calibration) as 1 process × 2 threads, 2 processes × 1 thread under DDP, and 2 × 1 under FSDP,
each in a fresh subprocess, and prints a Markdown table of steady-state tokens/s for the whole job and peak
memory per rank (the resident set on a CPU, allocated memory on a GPU; summary.json's peak_memory_mb). The
one-process peak is read from the finished child's resource usage; a first one-step run fills the token cache. Quiet machine needed: numbers from a
machine shared with other work say little."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare" / "input.txt"
# a small validation text (--val-fraction): evaluation is not what is timed
SHAPE = ["--n-layer", "6", "--d-model", "384", "--n-head", "6", "--context", "256", "--vocab-size", "8192",
         "--micro-batch", "8", "--batch-tokens", str(2 * 8 * 256), "--precision", "fp32", "--compile", "off",
         "--no-calibrate", "--optim", "adamw", "--val-fraction", "0.01"]


# runs a command and prints the peak resident set of its process tree's largest member, in KiB
PEAK_OF = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def run(name: str, launcher: list[str], threads: int, args: list[str], out: Path) -> tuple[dict, float]:
    """(summary.json, peak resident MiB) of one run in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-c", PEAK_OF, *launcher, *args, "--out", str(out / name),
                           "--threads", str(threads)], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stderr[-2000:]}")
    return json.loads((out / name / "summary.json").read_text()), int(done.stdout.split()[-1]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--data", default=str(DATA))
    a = p.parse_args()
    args = ["pretrain", "--data", a.data, "--max-steps", str(a.steps), "--eval-every", str(a.steps), *SHAPE]
    python = [sys.executable, "-m", "budgetlm"]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
                "-m", "budgetlm"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        os.environ.setdefault("BUDGETLM_CACHE", str(out / "cache"))
        run("warm-up", python, 2, [*args[:3], "--max-steps", "1", *args[5:]], out)  # tokenizing is not measured
        one, peak = run("one", python, 2, args, out)
        rows.append(("1 process × 2 threads", one, [peak]))
        for strategy in ("ddp", "fsdp"):
            s, _ = run(strategy, torchrun, 1, [*args, "--strategy", strategy], out)
            rows.append((f"2 processes × 1 thread, {strategy.upper()}", s, s["peak_memory_mb"]))
    print(f"{a.steps} steps of {2 * 8 * 256} tokens, {one['params'] / 1e6:.1f}M parameters, {one['device']}\n")
    print("| layout | tokens/s (whole job) | peak memory per rank (MiB) |")
    print("|---|---|---|")
    for name, s, memory in rows:
        print(f"| {name} | {s['tokens_per_s']:,.0f} | {' / '.join(f'{m:,.0f}' for m in memory)} |")


if __name__ == "__main__":
    main()
