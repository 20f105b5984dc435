"""The planner's efficiency table, measured on this machine: for each ladder shape, training tokens/s
(eager, micro-batch 8 at the planned context, AdamW, clipping) and the share of the planner's own
matmul-peak probe that its model FLOP/s reach, in fp32 and bf16.

    .venv/bin/python bench/planner_efficiency.py [--precisions fp32 bf16] [--steps 12] [--max-width 384]

The figures go into plan.CPU_EFFICIENCY and docs/planner.md."""

from __future__ import annotations

import argparse
import json
import time

import torch

from budgetlm.models.gpt import GPT
from budgetlm.models.config import ModelConfig
from budgetlm.plan import LADDER, context_for, flops_per_token, matmul_peak
from budgetlm.train.optim import build_optimizer
from budgetlm.train.runtime import keep_freed_memory, precision_dtype, set_threads
from common import training_step

VOCAB = 4096
MICRO_BATCH = 8


def tokens_per_s(n_layer: int, d_model: int, n_head: int, precision: str, steps: int) -> float:
    torch.manual_seed(0)
    context = context_for(d_model)
    model = GPT(ModelConfig(vocab_size=VOCAB, context=context, n_layer=n_layer, n_head=n_head, d_model=d_model))
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device=torch.device("cpu"))
    x = torch.randint(0, VOCAB, (MICRO_BATCH, context))
    y = torch.randint(0, VOCAB, (MICRO_BATCH, context))

    step = training_step(model, lambda: model(x, y), optimizer, torch.device("cpu"), precision)
    for _ in range(2):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * MICRO_BATCH * context / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--max-width", type=int, default=384)
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    keep_freed_memory()
    set_threads(None)
    rows = []
    for precision in args.precisions:
        dtype = precision_dtype(precision)
        # the planner remembers the best probe seen on a machine; five probes stand in for that
        peak = max(matmul_peak(torch.device("cpu"), dtype) for _ in range(5))
        print(f"{precision}: planner's matmul probe {peak / 1e9:.0f} GFLOP/s")
        for n_layer, d_model, n_head in LADDER:
            if d_model > args.max_width:
                break
            tps = tokens_per_s(n_layer, d_model, n_head, precision, args.steps)
            flops = tps * flops_per_token(n_layer, d_model, VOCAB, context_for(d_model))
            rows.append({"precision": precision, "shape": f"{n_layer}x{d_model}", "context": context_for(d_model),
                         "tokens_per_s": round(tps), "model_gflops": round(flops / 1e9, 1),
                         "peak_gflops": round(peak / 1e9), "efficiency": round(flops / peak, 3)})
            r = rows[-1]
            print(f"  {r['shape']:>6} ctx {r['context']}: {r['tokens_per_s']:>7,} tok/s  {r['model_gflops']:6.1f} GFLOP/s  "
                  f"efficiency {r['efficiency']:.2f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
