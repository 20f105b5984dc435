"""Page faults and tokens/s of one eager training step, with and without runtime.keep_freed_memory.

    .venv/bin/python bench/step_faults.py [--pairs 3] [--steps 12]

The step is the throughput check's: GPT 6×384 (ReLU² MLP), context 256, vocabulary 8192, micro-batch 8, the
default optimizer (Muon with AdamW), clipping, the autocast precision `--precision auto` picks. Each measurement
runs in its own process (the allocator setting cannot be undone), alternating."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def worker(keep: bool, steps: int) -> dict:
    from budgetlm.models.config import ModelConfig
    from budgetlm.models.gpt import GPT
    from budgetlm.train.optim import build_optimizer
    from budgetlm.train.runtime import keep_freed_memory, pick_precision, set_threads
    from common import training_step

    set_threads(None)
    if keep:
        keep_freed_memory()
    device = torch.device("cpu")
    precision = pick_precision("auto", device)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=8192, context=256, n_layer=6, n_head=6, d_model=384))
    optimizer = build_optimizer(model, "muon", lr=3e-3, weight_decay=0.1, device=device)
    x, y = torch.randint(0, 8192, (2, 8, 256))

    step = training_step(model, lambda: model(x, y), optimizer, device, precision)
    for _ in range(3):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - started
    return {"keep_freed_memory": keep, "precision": precision, "tokens_per_s": steps * 8 * 256 / seconds,
            "faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--worker", choices=("default", "keep"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker == "keep", args.steps)))
        return
    for _ in range(args.pairs):
        for mode in ("default", "keep"):
            done = subprocess.run([sys.executable, __file__, "--worker", mode, "--steps", str(args.steps)],
                                  capture_output=True, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{mode:8s} {r['tokens_per_s']:7.0f} tok/s  {r['faults_per_step']:8.0f} page faults a step"
                  f"  ({r['precision']})", flush=True)


if __name__ == "__main__":
    main()
