"""Training throughput of budgetlm's GPT against Hugging Face's LlamaForCausalLM at one shape, on this machine.

    .venv/bin/python bench/throughput.py [--rounds 2] [--steps 8] [--out docs/throughput.json]

In one run, alternating: the matmul peak (fp32, bf16), budgetlm training tokens/s and model FLOP/s (6·N per token
plus attention), HF Llama configured to the same shape (SwiGLU of the same width, tied embeddings, sdpa attention,
same precision, same fused AdamW, same clipping) once as it runs out of the box and once with budgetlm's allocator
setting (runtime.keep_freed_memory, to show what that alone buys), the ratios and peak memory of each, and
generation tokens/s with and without the KV cache. Each training measurement runs in a fresh subprocess, so peak
memory is its own. Everything runs on the GPU where one is visible, else on the CPU; on a GPU give more steps
(--steps 100), since 8 take milliseconds there."""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from budgetlm.plan import matmul_peak as plan_matmul_peak

# "hf_kept_memory": HF's model with budgetlm's allocator setting, to show what that setting alone buys
WORKERS = ("budgetlm", "hf", "hf_kept_memory")
SHAPE = dict(n_layer=6, d_model=384, n_head=6, context=256, vocab_size=8192, micro_batch=8)


def matmul_peak(dtype: torch.dtype, device: torch.device, seconds: float = 3.0) -> float:
    """GFLOP/s of large square matmuls on `device` (the planner's measurement, run longer): 8192² on a GPU; on a
    CPU 2048², halved until one product takes under a second (emulated bf16 is about 100× slower)."""
    n = 8192 if device.type == "cuda" else 2048
    while True:
        a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        if time.perf_counter() - start < 1.0 or n <= 256:
            break
        n //= 2
    return plan_matmul_peak(device, dtype, seconds, n) / 1e9


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(which: str, steps: int, precision: str, compile_mode: str) -> dict:
    """Train `steps` timed steps (after 2 warm-up steps) and report tokens/s; runs in a subprocess."""
    from budgetlm.models.config import ModelConfig
    from budgetlm.models.gpt import GPT
    from budgetlm.train.kernels import apply_kernels
    from budgetlm.train.optim import build_optimizer
    from budgetlm.train.compile import compile_language_model, decide
    from budgetlm.train.runtime import autocast, keep_freed_memory, pick_device, pick_precision, set_threads
    from common import training_step

    set_threads(None)
    if which != "hf":  # as the command line sets up its process (cli.main); "hf" runs as it does out of the box
        keep_freed_memory()
    device = pick_device("auto")
    precision = pick_precision(precision, device)
    s = SHAPE
    torch.manual_seed(0)
    if which == "budgetlm":
        config = ModelConfig(vocab_size=s["vocab_size"], context=s["context"], n_layer=s["n_layer"], n_head=s["n_head"],
                             d_model=s["d_model"], mlp="swiglu", mlp_ratio=4.0)
        model = GPT(config).to(device)
        apply_kernels(model, device)
        decision = decide(compile_mode, model.config, s["micro_batch"], device, precision, None)
        compiled = decision.compile
        if compiled:  # the Transformer block, as pretrain compiles it (train/compile.py)
            compile_language_model(model, decision.cache, s["micro_batch"], s["context"],
                                   lambda: autocast(device, precision))
        step_loss = lambda x, y: model(x, y)
        flops_per_token = model.flops_per_token()
    else:
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["d_model"], intermediate_size=4 * s["d_model"],
                             num_hidden_layers=s["n_layer"], num_attention_heads=s["n_head"],
                             num_key_value_heads=s["n_head"], max_position_embeddings=s["context"],
                             tie_word_embeddings=True, attn_implementation="sdpa")
        model = LlamaForCausalLM(config).to(device)
        compiled = False
        step_loss = lambda x, y: model(input_ids=x, labels=y).loss
        flops_per_token = None
    optimizer = build_optimizer(model, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), device=device)
    x = torch.randint(0, s["vocab_size"], (s["micro_batch"], s["context"]), device=device)
    y = torch.randint(0, s["vocab_size"], (s["micro_batch"], s["context"]), device=device)

    step = training_step(model, lambda: step_loss(x, y), optimizer, device, precision)
    started = time.perf_counter()
    for _ in range(2):
        step()
    _synchronize(device)
    warmup_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    tps = steps * s["micro_batch"] * s["context"] / (time.perf_counter() - started)
    params = sum(p.numel() for p in model.parameters())
    return {"which": which, "tokens_per_s": tps, "params": params, "precision": precision, "compiled": compiled,
            "warmup_s": warmup_s, "peak_memory_mb": _peak_memory_mb(device),
            "model_gflops": tps * (flops_per_token or 0) / 1e9}


def machine_name() -> str:
    """The processor's model name with its family and model numbers: "AMD EPYC" alone names several
    generations whose matmul speed differs by 2.5× (seen on this project's machines)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        info = dict(line.split(":", 1) for line in open("/proc/cpuinfo") if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        return f"{info['model name']} (family {info['cpu family']}, model {info['model']})"
    except (OSError, KeyError):
        return platform.processor() or platform.machine()


def generation_speed(new_tokens: int = 256, rounds: int = 3) -> dict:
    """Greedy decoding at batch 1 at the reference shape, with and without the KV cache (alternating, the
    median of `rounds`), in fp32 and in the precision that `budgetlm generate` picks on this machine, with
    the weights packed as it packs them."""
    from budgetlm.models.config import ModelConfig
    from budgetlm.models.gpt import GPT
    from budgetlm.models.sampling import generate
    from budgetlm.train.kernels import apply_kernels, cache_dtype
    from budgetlm.train.packed import pack_for_inference
    from budgetlm.train.runtime import pick_device, pick_precision, precision_dtype

    s = SHAPE
    device = pick_device("auto")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=s["vocab_size"], context=s["context"], n_layer=s["n_layer"], n_head=s["n_head"],
                       d_model=s["d_model"], mlp="swiglu", mlp_ratio=4.0)
    fp32_weights = GPT(config).state_dict()
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    result = {"precision": pick_precision("auto", device)}
    for precision in dict.fromkeys(("fp32", result["precision"])):
        model = GPT(config).eval()
        model.load_state_dict(fp32_weights)
        model.to(device)
        model.cast_weights(precision_dtype(precision))
        apply_kernels(model, device)
        result[f"{precision}_packed"] = pack_for_inference(model)
        kv = cache_dtype(device, model.embed.weight.dtype)
        speeds = {True: [], False: []}
        for cached in (True, False):
            list(generate(model, prompt, 8, temperature=0, use_cache=cached, cache_dtype=kv))  # warm up
        for _ in range(rounds):
            for cached in (True, False):
                started = time.perf_counter()
                list(generate(model, prompt, new_tokens, temperature=0, use_cache=cached, cache_dtype=kv))
                _synchronize(device)
                speeds[cached].append(new_tokens / (time.perf_counter() - started))
        result[f"{precision}_cached"] = statistics.median(speeds[True])
        result[f"{precision}_uncached"] = statistics.median(speeds[False])
    p = result["precision"]
    result.update(cached=result[f"{p}_cached"], uncached=result[f"{p}_uncached"])
    result["speedup"] = result["cached"] / result["uncached"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of budgetlm and HF")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per measurement")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.precision, args.compile)))
        return

    from budgetlm.train.runtime import keep_freed_memory, pick_device

    device = pick_device("auto")
    keep_freed_memory()  # as `budgetlm generate` does, for the generation figures
    # The peaks are measured again in every round: this machine's speed drifted by 2x within an hour, so a
    # fraction of the peak is only meaningful against a peak taken beside the run it divides.
    rounds: list[dict] = []
    runs: dict[str, list[dict]] = {which: [] for which in WORKERS}
    for r in range(args.rounds):
        peaks = {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}
        print(f"round {r + 1} matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s",
              flush=True)
        for which in WORKERS:
            cmd = [sys.executable, __file__, "--worker", which, "--steps", str(args.steps),
                   "--precision", args.precision, "--compile", args.compile]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            runs[which].append(result)
            print(f"round {r + 1} {which:14s} {result['tokens_per_s']:8.0f} tok/s"
                  f"  peak {result['peak_memory_mb']:.0f} MB"
                  f"  ({result['precision']}, {'compiled' if result['compiled'] else 'eager'})", flush=True)
        ours_r = runs["budgetlm"][-1]
        precision = ours_r["precision"]
        rounds.append({"matmul_peak_gflops": peaks, "mfu_vs_bf16_peak": ours_r["model_gflops"] / peaks["bf16"],
                       "mfu_vs_peak_of_precision_used": ours_r["model_gflops"] / peaks[precision]})
    ours = statistics.median(r["tokens_per_s"] for r in runs["budgetlm"])
    theirs = statistics.median(r["tokens_per_s"] for r in runs["hf"])
    theirs_kept = statistics.median(r["tokens_per_s"] for r in runs["hf_kept_memory"])
    gflops = statistics.median(r["model_gflops"] for r in runs["budgetlm"])
    peaks = {k: statistics.median(r["matmul_peak_gflops"][k] for r in rounds) for k in ("fp32", "bf16")}
    mfu_bf16 = statistics.median(r["mfu_vs_bf16_peak"] for r in rounds)
    mfu_own = statistics.median(r["mfu_vs_peak_of_precision_used"] for r in rounds)
    gen = generation_speed()
    report = {
        "machine": f"{machine_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "shape": SHAPE, "rounds": rounds, "matmul_peak_gflops": peaks, "budgetlm": runs["budgetlm"],
        "hf_llama": runs["hf"], "hf_kept_memory": runs["hf_kept_memory"], "budgetlm_tokens_per_s": ours,
        "hf_tokens_per_s": theirs, "ratio_vs_hf": ours / theirs, "hf_kept_memory_tokens_per_s": theirs_kept,
        "ratio_vs_hf_kept_memory": ours / theirs_kept,
        "budgetlm_model_gflops": gflops, "mfu_vs_bf16_peak": mfu_bf16, "mfu_vs_peak_of_precision_used": mfu_own,
        "generation": gen,
    }
    if peaks["bf16"] > peaks["fp32"]:
        of_peaks = f"{mfu_bf16:.0%} of the bf16 peak"
        if precision != "bf16":
            of_peaks += f", {mfu_own:.0%} of the {precision} peak"
    else:  # a bf16 "peak" below fp32's is emulation, not a hardware limit to compare with
        of_peaks = f"{mfu_own:.0%} of the {precision} peak; bf16 is emulated on this CPU"
    print(f"budgetlm {ours:.0f} tok/s ({gflops:.0f} GFLOP/s: {of_peaks}, medians of the rounds) "
          f"vs HF Llama {theirs:.0f} tok/s: ratio {ours / theirs:.2f}; "
          f"vs HF with freed memory kept as budgetlm keeps it {theirs_kept:.0f} tok/s: ratio {ours / theirs_kept:.2f}")
    print(f"generation at 256 new tokens ({gen['precision']}): cached {gen['cached']:.0f} tok/s, "
          f"uncached {gen['uncached']:.0f} tok/s ({gen['speedup']:.1f}x); fp32: cached {gen['fp32_cached']:.0f}, "
          f"uncached {gen['fp32_uncached']:.0f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
