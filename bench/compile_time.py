"""Compile time of budgetlm's training step at the planner's ladder shapes, cold and warm, and what compiling buys.

    .venv/bin/python bench/compile_time.py [--shapes 4x128,6x384] [--steps 10] [--rounds 3] [--out runs/compile.json]

For each shape (default: the ladder up to 6×384, at the plan's context, vocabulary 4,096, dropout 0.1, micro-batch
8, the precision `auto` picks), with its own empty cache folder (BUDGETLM_CACHE), two fresh processes each compile
the Transformer block as pretrain does (train/compile.compile_language_model): the first with the cache empty (cold),
the second with it filled (warm). Compile seconds are that first forward and backward, as pretrain logs them; the
process's start (imports) is reported apart. The second process then times `--steps` AdamW training steps of an
eager copy of the model and of the compiled one, alternating for `--rounds` rounds (medians)."""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

STARTED = time.perf_counter()

import torch  # noqa: E402  (the import's time is reported)

VOCAB, MICRO_BATCH = 4096, 8


def worker(shape: str, steps: int, rounds: int) -> dict:
    """One fresh process: build the shape, compile its block (timed), then, if `steps`, time `steps` AdamW training
    steps of an eager copy and of the compiled model, alternating for `rounds` rounds."""
    from budgetlm.models.config import ModelConfig
    from budgetlm.models.gpt import GPT
    from budgetlm.plan import LADDER, context_for
    from budgetlm.train.compile import compile_cache, compile_language_model
    from budgetlm.train.kernels import apply_kernels
    from budgetlm.train.optim import build_optimizer
    from budgetlm.train.runtime import autocast, keep_freed_memory, pick_device, pick_precision, set_threads

    set_threads(None)
    keep_freed_memory()  # as the command line sets up its process
    imported_s = time.perf_counter() - STARTED
    device = pick_device("auto")
    precision = pick_precision("auto", device)
    n_layer, d_model = (int(v) for v in shape.split("x"))
    n_head = next(h for n, d, h in LADDER if (n, d) == (n_layer, d_model))
    context = context_for(d_model)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=VOCAB, context=context, n_layer=n_layer, n_head=n_head, d_model=d_model,
                            dropout=0.1)).to(device)
    apply_kernels(model, device)
    eager = copy.deepcopy(model)
    amp = lambda: autocast(device, precision)  # noqa: E731
    cache = compile_cache(model.config, MICRO_BATCH, device, precision)
    result = {"shape": shape, "context": context, "precision": precision, "warm_cache": cache.is_warm(),
              "imported_s": round(imported_s, 2)}
    result["compile_s"] = round(compile_language_model(model, cache, MICRO_BATCH, context, amp), 2)
    if not steps:
        return result
    x = torch.randint(0, VOCAB, (MICRO_BATCH, context), device=device)

    def trainer(m):
        optimizer = build_optimizer(m, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), device=device)

        def step():
            with amp():
                loss = m(x, x)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    steppers = {"eager": trainer(eager), "compiled": trainer(model)}
    for step in steppers.values():
        for _ in range(2):
            step()
    speeds = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, step in steppers.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            speeds[name].append(steps * MICRO_BATCH * context / (time.perf_counter() - started))
    for name, values in speeds.items():
        result[f"{name}_tokens_per_s"] = round(statistics.median(values), 1)
    return result


def run_worker(shape: str, steps: int, rounds: int, cache: str) -> dict:
    env = {**os.environ, "BUDGETLM_CACHE": cache}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # budgetlm's folder, not one left over from elsewhere
    args = [sys.executable, __file__, "--worker", shape, "--steps", str(steps), "--rounds", str(rounds)]
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"worker {shape} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="2x64,3x96,4x128,4x192,6x256,6x384",
                        help="n_layer x d_model of ladder shapes, comma-separated")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per round (0: compile only)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of eager and compiled steps, alternating")
    parser.add_argument("--out", help="write the results here as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.rounds)))
        return
    rows = []
    for shape in args.shapes.split(","):
        with tempfile.TemporaryDirectory(prefix="budgetlm-compile-") as cache:
            cold = run_worker(shape, 0, 0, cache)
            warm = run_worker(shape, args.steps, args.rounds, cache)
        assert not cold["warm_cache"] and warm["warm_cache"], "the second compile did not find the first's cache"
        row = {"shape": shape, "context": warm["context"], "precision": warm["precision"],
               "cold_compile_s": cold["compile_s"], "warm_compile_s": warm["compile_s"],
               "process_start_s": warm["imported_s"]}
        speed = ""
        if args.steps:
            row.update(eager_tokens_per_s=warm["eager_tokens_per_s"], compiled_tokens_per_s=warm["compiled_tokens_per_s"],
                       speedup=round(warm["compiled_tokens_per_s"] / warm["eager_tokens_per_s"], 3))
            speed = (f", eager {row['eager_tokens_per_s']:,.0f} → compiled {row['compiled_tokens_per_s']:,.0f} "
                     f"tokens/s (×{row['speedup']:.2f})")
        rows.append(row)
        print(f"{shape} ctx {row['context']} {row['precision']}: compile cold {row['cold_compile_s']:.1f}s, "
              f"warm {row['warm_compile_s']:.1f}s (process start {row['process_start_s']:.1f}s){speed}", flush=True)
    result = {"machine": _machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "vocab": VOCAB, "micro_batch": MICRO_BATCH, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


def _machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "cpu"


if __name__ == "__main__":
    main()
