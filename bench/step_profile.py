"""Where a training step's time goes: matrix products against everything else, eager and compiled.

    .venv/bin/python bench/step_profile.py [--shape 4x128] [--vocab 4096] [--micro-batch 8] [--steps 10]

Builds the GPT budgetlm plans at that shape (as pretrain builds it: SwiGLU, the CPU kernels applied, Muon), times
`--steps` training steps eager and then compiled as pretrain compiles (the Transformer block and the block-wise
loss's step, train/compile.compile_language_model; a fresh cache folder, so the compile is cold and not counted), and profiles a few steps of each with torch.profiler, splitting the time of the ops
into matrix products (aten::mm, bmm, addmm, linear's and sdpa's products, and Inductor's calls to them) and the
rest. Compiling fuses and removes the rest; it does not make a matrix product faster, so eager step time × the
products' share bounds what compiling can gain: eager ÷ (eager × products' share) is the speed-up if everything
else took no time."""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from budgetlm.models.config import ModelConfig
from budgetlm.models.gpt import GPT
from budgetlm.train.compile import compile_language_model
from budgetlm.train.kernels import apply_kernels
from budgetlm.train.optim import build_optimizer
from budgetlm.train.runtime import autocast, keep_freed_memory, pick_device, pick_precision, set_threads

MATMUL_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_mkldnn_matmul", "mkldnn::_linear_pointwise",
              "aten::mkldnn_linear", "mkldnn::_linear_pointwise.binary", "aten::_weight_int8pack_mm"}


def build(shape: str, vocab: int, micro_batch: int, precision: str, compiled: bool):
    n_layer, d_model = (int(v) for v in shape.split("x"))
    device = pick_device("auto")
    config = ModelConfig(vocab_size=vocab, context=256, n_layer=n_layer, d_model=d_model, n_head=max(1, d_model // 64),
                         canon=0, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    apply_kernels(model, device)
    run_autocast = lambda: autocast(device, precision)
    if compiled:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
        seconds = compile_language_model(model, None, micro_batch, config.context, run_autocast)
        print(f"compiled the block and the loss in {seconds:.1f}s (cold)")
    optimizer = build_optimizer(model, "muon", lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), device=device,
                                precision=precision)
    x = torch.randint(0, vocab, (micro_batch, config.context), device=device)

    def step():
        with run_autocast():
            loss = model(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, micro_batch * config.context


def measure(step, tokens: int, steps: int) -> tuple[float, float, dict]:
    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - started) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    totals = {}
    for event in prof.key_averages():
        totals[event.key] = totals.get(event.key, 0.0) + event.self_cpu_time_total
    whole = sum(totals.values())
    products = sum(t for k, t in totals.items() if k in MATMUL_OPS or "gemm" in k.lower() or k.endswith("mm"))
    top = dict(sorted(totals.items(), key=lambda kv: -kv[1])[:12])
    return tokens / seconds, products / whole, {k: round(v / whole, 3) for k, v in top.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4x128")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    set_threads(None)
    keep_freed_memory()
    precision = pick_precision(args.precision, pick_device("auto"))
    results = {}
    for compiled in (False, True):
        step, tokens = build(args.shape, args.vocab, args.micro_batch, precision, compiled)
        speed, share, top = measure(step, tokens, args.steps)
        name = "compiled" if compiled else "eager"
        results[name] = (speed, share)
        print(f"{name}: {speed:,.0f} tokens/s; matrix products {share:.0%} of the profiled op time")
        print("  largest self times:", ", ".join(f"{k} {v:.1%}" for k, v in top.items()))
    eager_speed, eager_share = results["eager"]
    print(f"\n{args.shape}, vocabulary {args.vocab}, micro-batch {args.micro_batch}, {precision}: compiled ÷ eager "
          f"{results['compiled'][0] / eager_speed:.2f}; bound if everything but the products took no time: "
          f"{1 / eager_share:.2f}")


if __name__ == "__main__":
    main()
