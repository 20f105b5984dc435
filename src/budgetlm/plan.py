"""The planner: from a time budget, the device's speed and the corpus size to a model size, batch and
learning rate.

For each shape of a ladder of GPTs it estimates how many tokens the budget lets that shape see
(measured matmul peak × an efficiency that grows with width ÷ FLOPs per token), discounts repeated
epochs of a small corpus (Muennighoff et al. 2023), and picks the shape with the lowest loss predicted
by the Chinchilla fit L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, approach 3). On this
project's reference CPU the pick agrees with a sweep of sizes (see docs/planner.md)."""

from __future__ import annotations

import json
import math
import os
import time
import dataclasses
from dataclasses import dataclass, fields

import torch

from budgetlm.data.tokens import cache_dir, remember, supports_bpe_dropout
from budgetlm.errors import UserError
from budgetlm.models.config import SIZES, ModelConfig
from budgetlm.models.bert import MASK_RATE
from budgetlm.models.gpt import GPT
from budgetlm.models.t5 import encoder_decoder_flops
from budgetlm.train.kernels import apply_kernels
from budgetlm.train.optim import build_optimizer, default_lr
from budgetlm.train.runtime import autocast, precision_dtype

# (n_layer, d_model, n_head): width grows faster than depth at small scale, as in the GPT-2/Pythia families
LADDER = [(2, 64, 2), (3, 96, 2), (4, 128, 2), (4, 192, 3), (6, 256, 4), (6, 384, 6), (8, 512, 8),
          (12, 768, 12), (16, 1024, 16), (24, 1536, 16), (32, 2048, 16)]

CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
REPEAT_HALF_LIFE = 15.4  # R*: epochs of repetition after which more repeats are worth little (Muennighoff)
# A model far larger than its unique data memorizes it: on tinyshakespeare (350k tokens) at 5 minutes,
# 4x128 (1.0M parameters) beat 4x192 (2.2M) and 6x128 on validation, though the fit above prefers
# the larger ones; the fit was made on far larger models and data. Shapes beyond this many
# body (non-embedding) parameters per unique training token are skipped (the smallest shape is
# always allowed). The embedding is left out: counted in, a larger vocabulary pushed tinyshakespeare
# down to 3x96, while 4x128 with a 4,096-token vocabulary was the best measured there (docs/planner.md).
MAX_PARAMS_PER_TOKEN = 4.0
OVERHEAD = 0.85          # share of the budget left for training steps (data, evaluation, saving, warm-up)
STEPS_TARGET = 2000      # optimizer steps a run should get: small budgets need many small steps
# Up to about 4 epochs, repeated tokens are nearly as good as fresh ones (Muennighoff et al. 2023);
# beyond, the model starts to memorize. On tinyshakespeare at 5 minutes and about 20 epochs (bf16 CPU),
# dropout 0.1 reached 2.087 bpb against 2.141 without (docs/planner.md).
REPEATS_BEFORE_DROPOUT = 4.0
REPEAT_DROPOUT = 0.1
# Further on, the training text is also re-segmented by BPE-dropout (data/tokens.py). Paired at 5 minutes, planned
# epochs: it paid at 16 (tinyshakespeare, 2.085 → 1.996 bpb) and 18 (WikiText-2's first megabyte, 1.875 → 1.864) and
# cost at 7.1 (the whole of WikiText-2, 1.612 → 1.651) and at 4.2 (SST-2's sentences); docs/planner.md.
# 8 and 10 passes and rate 0.2 were no better. Each pass is a copy of the token stream.
REPEATS_BEFORE_BPE_DROPOUT = 10.0
REPEAT_BPE_DROPOUT = 0.1
MAX_BPE_PASSES = 4
# A moving average of the weights (--ema 0.998) and Canon layers (--canon 4) are planned for a GPT that reads its
# text more than 10 times: at 5 minutes, paired by seed over three seeds, each beat its absence on tinyshakespeare
# (16 planned epochs) and both together on the first megabyte of WikiText-2 (18 planned epochs), while neither beat
# the noise on the whole of WikiText-2 (6 planned epochs); docs/planner.md, "A moving average of the weights, and
# Canon layers". Planned epochs run about 1.5x the epochs a run reads (evaluation and start-up take their share).
REPEATS_BEFORE_AVERAGE = 10.0
REPEAT_EMA = 0.998
REPEAT_CANON = 4
CANON_SPEED = 0.88  # tokens/s with Canon layers / without, on a CPU (docs/planner.md)


@dataclass
class Plan:
    n_layer: int
    d_model: int
    n_head: int
    context: int
    batch_tokens: int
    micro_batch: int
    expected_tokens: int
    peak_flops: float
    expected_epochs: float
    dropout: float
    bpe_dropout: float = 0.0
    ema: float = 0.0                     # the weights' moving average planned (0: none)
    canon: int = 0                       # the Canon layers' kernel planned (0: none)
    lr: float = 0.0                      # peak learning rate (learning_rate below)
    budget_flops: float | None = None    # the compute budget planned for, if one was given
    speed: str = "assumed"               # the pick's tokens/s: "measured" by the probe, "scaled" (the table × the
                                         # probe's factor) or "assumed" (the efficiency table)
    tokens_per_s: float = 0.0
    memory_bytes: int = 0                # estimated peak of a training step (memory_estimate)
    memory_limit: int | None = None      # what the device had free when planned
    predicted_loss: float = 0.0          # the Chinchilla fit's figure the shapes were ranked by
    candidates: list = dataclasses.field(default_factory=list)  # every shape weighed, as dicts

    @classmethod
    def from_dict(cls, d: dict | None) -> "Plan | None":
        """A plan saved with a run (a checkpoint's meta), or None where none was saved."""
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in (d or {}).items() if k in known})
        except TypeError:
            return None

    def describe(self) -> str:
        against = [f"dropout {self.dropout:g}"] if self.dropout else []
        if self.bpe_dropout:
            against.append(f"BPE-dropout {self.bpe_dropout:g}")
        if self.canon:
            against.append(f"Canon layers {self.canon}")
        if self.ema:
            against.append(f"a moving average {self.ema:g}")
        regularized = f", {', '.join(against)} against memorizing" if against else ""
        speed = CANON_SPEED if self.canon else 1.0
        return (f"planned {self.n_layer}×{self.d_model} at context {self.context}, batch {self.batch_tokens} tokens, "
                f"about {self.expected_tokens * speed / 1e6:.1f}M training tokens ({self.expected_epochs * speed:.1f} "
                f"epochs) in the "
                f"budget{regularized}, lr {self.lr:.2e} (matmul peak {self.peak_flops / 1e9:.0f} GFLOP/s, "
                f"speed {self.speed})")


def device_peak(device: torch.device, dtype: torch.dtype) -> float:
    """The matmul peak of this device, measured now and remembered as the best seen on this machine,
    so that a moment of load elsewhere does not change the plan (plans stay repeatable)."""
    key = f"{_device_key(device)}/{dtype}/torch{torch.__version__}"
    path = cache_dir() / "device_peaks.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    peak = max(matmul_peak(device, dtype), float(known.get(key, 0.0)))
    if peak != known.get(key):
        known[key] = peak
        remember(path, known)
    return peak


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.3, n: int | None = None) -> float:
    """FLOP/s of repeated n × n matmuls, by default large enough to reach the device's steady state."""
    n = n or (1024 if device.type == "cpu" else 4096)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while True:
        c = a @ b
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        if time.perf_counter() - start >= seconds:
            break
    del c
    return 2 * n**3 * count / (time.perf_counter() - start)


# Model FLOP/s ÷ matmul peak of a training step by width and precision, measured with
# bench/planner_efficiency.py (2-core EPYC, eager, micro-batch 8 at the planned context; docs/planner.md).
# Small widths lose to per-op overhead, which bf16's faster matmuls do not shrink: there a step reaches
# a far smaller share of the (4× higher) peak. The rate is held flat beyond the widest shape measured.
CPU_EFFICIENCY = {
    "fp32": {64: 0.26, 96: 0.43, 128: 0.54, 192: 0.67, 256: 0.70, 384: 0.80},
    "bf16": {64: 0.10, 96: 0.17, 128: 0.24, 192: 0.35, 256: 0.41, 384: 0.54},
}


def efficiency(d_model: int, device: torch.device, precision: str = "fp32") -> float:
    """Share of the matmul peak a training step reaches at this width. GPU: an uncalibrated guess,
    since small models there are bound by kernel launches."""
    if device.type != "cpu":
        return min(0.5, d_model / 3000)
    table = CPU_EFFICIENCY["fp32" if precision == "fp32" else "bf16"]
    widths = sorted(table)
    if d_model <= widths[0]:
        return table[widths[0]]
    for low, high in zip(widths, widths[1:]):
        if d_model <= high:
            t = (d_model - low) / (high - low)
            return table[low] + t * (table[high] - table[low])
    return table[widths[-1]]


def context_for(d_model: int) -> int:
    # 256 from d_model 128: on tinyshakespeare at 5 minutes, 4x128 reached 2.110 bpb at 256 vs 2.139 at 128
    return 128 if d_model < 128 else 256 if d_model < 768 else 512 if d_model < 1536 else 1024


def flops_per_token(n_layer: int, d_model: int, vocab: int, context: int, mlp_ratio: float = 4.0,
                    arch: str = "gpt", mask_rate: float = MASK_RATE) -> float:
    """Training FLOPs per token of text. A GPT: 6 per parameter and PaLM's attention term (which counts the whole
    window: no causal saving in either). A BERT: the same body, but the tied head only for the masked share. A T5:
    encoder, decoder with cross-attention and head over the lengths span corruption gives them (models/t5.py)."""
    body = n_layer * (4 + 2 * mlp_ratio) * d_model**2
    if arch == "t5":
        return encoder_decoder_flops(n_layer, d_model, vocab, context, mlp_ratio)
    head_share = mask_rate if arch == "bert" else 1.0
    return 6 * (body + head_share * vocab * d_model) + 12 * n_layer * d_model * context


def body_params(n_layer: int, d_model: int, arch: str = "gpt") -> int:
    """Non-embedding parameters: a T5 has two stacks, the decoder's with cross-attention (4·d_model² a layer)."""
    layer = 12 * d_model**2
    return n_layer * (2 * layer + 4 * d_model**2) if arch == "t5" else n_layer * layer


def predicted_loss(n_params: float, tokens: float, unique_tokens: float) -> float:
    c = CHINCHILLA
    repeats = max(tokens / max(unique_tokens, 1.0) - 1.0, 0.0)
    effective = min(tokens, unique_tokens * (1 + REPEAT_HALF_LIFE * (1 - math.exp(-repeats / REPEAT_HALF_LIFE))))
    return c["E"] + c["A"] / n_params ** c["alpha"] + c["B"] / max(effective, 1.0) ** c["beta"]


def plan(budget_s: float | None, *, train_tokens: int, vocab: int, device: torch.device, precision: str,
         micro_batch: int | None = None, peak_flops: float | None = None, budget_flops: float | None = None,
         speeds: dict | None = None, memory_limit: int | None = None, optim: str = "muon",
         ladder: list | None = None, arch: str = "gpt", mask_rate: float = MASK_RATE) -> Plan:
    """The ladder shape with the lowest predicted loss after `budget_s` seconds of training and/or
    `budget_flops` model FLOPs, among the shapes that fit `memory_limit` bytes. `speeds` maps
    (n_layer, d_model) to training tokens/s measured on this device (probe_speeds); other shapes'
    speed comes from the efficiency table. `ladder`: other shapes to weigh (a single one: the plan's
    rules applied to that shape, as bench/planner_regret.py does). Every architecture by the same rule, with
    its own parameter count and FLOPs per token."""
    if not budget_s and not budget_flops:
        raise ValueError("plan needs a time or a FLOP budget")
    peak = peak_flops or device_peak(device, precision_dtype(precision))
    weighed = candidates(budget_s, train_tokens=train_tokens, vocab=vocab, device=device, precision=precision,
                         micro_batch=micro_batch, peak=peak, budget_flops=budget_flops, speeds=speeds or {},
                         memory_limit=memory_limit, ladder=ladder or LADDER, arch=arch,
                         mask_rate=mask_rate)
    best = min((c for c in weighed if c["fits"]), key=lambda c: c["predicted_loss"])
    n_layer, d_model, n_head, context, tokens = (best[k] for k in ("n_layer", "d_model", "n_head", "context", "tokens"))
    micro = best["micro_batch"]
    batch = max(micro * context, 2 ** round(math.log2(max(tokens / STEPS_TARGET, 1))))
    batch = micro * context * max(1, round(batch / (micro * context)))
    epochs = tokens / max(train_tokens, 1)
    repeated = epochs > REPEATS_BEFORE_DROPOUT
    averaged = arch == "gpt" and epochs > REPEATS_BEFORE_AVERAGE  # measured on GPTs only
    return Plan(n_layer, d_model, n_head, context, batch, micro, int(tokens), peak, epochs,
                REPEAT_DROPOUT if repeated else 0.0,
                REPEAT_BPE_DROPOUT if epochs > REPEATS_BEFORE_BPE_DROPOUT else 0.0,
                ema=REPEAT_EMA if averaged else 0.0, canon=REPEAT_CANON if averaged else 0,
                lr=learning_rate(d_model, batch, optim), budget_flops=budget_flops, speed=best["speed"],
                tokens_per_s=best["tokens_per_s"], memory_bytes=best["memory_bytes"], memory_limit=memory_limit,
                predicted_loss=best["predicted_loss"], candidates=weighed)


def probe_scale(speeds: dict, vocab: int, device: torch.device, precision: str, peak: float) -> float:
    """How much faster than the efficiency table the probed shapes ran here (geometric mean): the factor
    for the shapes not probed, so measured and assumed speeds compare on one footing."""
    ratios = []
    for (n_layer, d_model), per_s in speeds.items():
        per_token = flops_per_token(n_layer, d_model, vocab, context_for(d_model))
        ratios.append(per_s * per_token / (efficiency(d_model, device, precision) * peak))
    return math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else 1.0


def default_micro_batch(device: torch.device, context: int) -> int:
    return 8 if device.type == "cpu" else max(8, 32768 // context)


def candidates(budget_s: float | None, *, train_tokens: int, vocab: int, device: torch.device, precision: str,
               micro_batch: int | None, peak: float, budget_flops: float | None, speeds: dict,
               memory_limit: int | None, ladder: list = LADDER, arch: str = "gpt",
               mask_rate: float = MASK_RATE) -> list[dict]:
    """Each ladder shape the plan weighs: the tokens its budget affords, its predicted loss, its speed
    (measured or assumed) and whether it fits memory, smallest first, up to the memorization guard."""
    weighed: list[dict] = []
    scale = probe_scale(speeds, vocab, device, precision, peak)
    for n_layer, d_model, n_head in ladder:
        body = body_params(n_layer, d_model, arch)
        n_params = body + vocab * d_model  # every parameter, as Chinchilla counts them
        if weighed and body > MAX_PARAMS_PER_TOKEN * train_tokens:
            break
        context = context_for(d_model)
        per_token = flops_per_token(n_layer, d_model, vocab, context, arch=arch, mask_rate=mask_rate)
        measured = speeds.get((n_layer, d_model))
        per_s = measured or scale * efficiency(d_model, device, precision) * peak / per_token
        limits = []
        if budget_s:
            limits.append(per_s * budget_s * OVERHEAD)
        if budget_flops:
            limits.append(budget_flops / per_token)
        tokens = min(limits)
        micro = micro_batch or default_micro_batch(device, context)
        need = memory_estimate(n_layer, d_model, n_head, context, vocab, micro, precision)
        while memory_limit and need > MEMORY_SHARE * memory_limit and micro > 1 and not micro_batch:
            micro //= 2  # a smaller micro-batch, more accumulation: the same batch in less memory
            need = memory_estimate(n_layer, d_model, n_head, context, vocab, micro, precision)
        fits = not memory_limit or need <= MEMORY_SHARE * memory_limit
        weighed.append({"n_layer": n_layer, "d_model": d_model, "n_head": n_head, "context": context,
                        "micro_batch": micro, "params": n_params, "params_without_embedding": body,
                        "flops_per_token": per_token, "tokens": int(tokens), "epochs": tokens / max(train_tokens, 1),
                        "predicted_loss": predicted_loss(n_params, tokens, train_tokens), "tokens_per_s": per_s,
                        "speed": "measured" if measured else "scaled" if speeds else "assumed",
                        "efficiency": per_s * per_token / peak, "memory_bytes": need, "fits": fits})
        if not fits:
            break  # a larger shape needs more memory still
    if not any(c["fits"] for c in weighed):
        c = weighed[0]
        raise UserError(f"even the smallest model ({c['n_layer']}x{c['d_model']}, micro-batch {c['micro_batch']}) "
                        f"needs about {c['memory_bytes'] / 2**20:,.0f} MiB, more than the "
                        f"{memory_limit / 2**20:,.0f} MiB free on {device}; free memory or use another device")
    return weighed


def bpe_passes(expected_epochs: float | None) -> int:
    """Noisy passes of BPE-dropout for a run expected to read its text `expected_epochs` times
    (None: not known): one per epoch after the first, rounded up, so the stream is about as long
    as what the run reads."""
    if expected_epochs is None:
        return MAX_BPE_PASSES
    return int(min(MAX_BPE_PASSES, max(1, math.ceil(expected_epochs) - 1)))


def given_or_planned(given, planned: Plan | None, field: str, off):
    """A setting the plan may choose: the flag where given, else the plan's, else `off` (no plan)."""
    if given is not None:
        return given
    return getattr(planned, field) if planned else off


def model_for(m: ModelConfig, vocab_size: int, planned: Plan | None) -> ModelConfig:
    """The model's whole shape: explicit flags first, then the size preset, then the plan, then the `small`
    preset."""
    if m.size:
        n_layer, d_model, n_head = SIZES[m.size]
    elif planned is not None:
        n_layer, d_model, n_head = planned.n_layer, planned.d_model, planned.n_head
    else:
        n_layer, d_model, n_head = SIZES["small"]
    d_model = m.d_model or d_model
    return dataclasses.replace(
        m,
        vocab_size=math.ceil(vocab_size / 64) * 64,  # a multiple of 64 keeps the head's matmul fast
        context=m.context or (planned.context if planned else context_for(d_model)),
        n_layer=m.n_layer or n_layer,
        d_model=d_model,
        n_head=m.n_head or (n_head if not m.d_model else max(1, d_model // 64)),
        canon=given_or_planned(m.canon, planned, "canon", 0),
        dropout=given_or_planned(m.dropout, planned, "dropout", 0.0),
    )


# ---------------------------------------------------------------- learning rate

def learning_rate(d_model: int, batch_tokens: int, optim: str = "muon") -> float:
    """The planned peak learning rate. Width: AdamW's 1.5e-3 × 256 / d_model (µP-like), times the
    optimizer's factor (train/optim.py default_lr). Batch: not scaled; the plan keeps its batch near
    STEPS_TARGET steps a run, and no run here has measured a rate against the batch (docs/planner.md)."""
    del batch_tokens  # part of the rule's inputs; measured figures exist only at one batch (docs/planner.md)
    return default_lr(d_model, optim)


# ---------------------------------------------------------------- memory

MEMORY_SHARE = 0.8  # of the free memory a plan may use: the allocator, the data and the evaluation need the rest


def memory_estimate(n_layer: int, d_model: int, n_head: int, context: int, vocab: int, micro_batch: int,
                    precision: str, mlp_ratio: float = 4.0) -> int:
    """Bytes a training step holds at its peak: fp32 weights, gradients and two optimizer moments
    (16 bytes a parameter), the activations kept for the backward pass (Korthikanti et al. 2022: about
    34·d + 5·heads·context bytes a token and layer in 16 bits, twice that in fp32, attention scores
    included as the math kernel keeps them), and the logits with their gradient in fp32."""
    params = n_layer * (4 + 2 * mlp_ratio) * d_model**2 + vocab * d_model
    tokens = micro_batch * context
    width = 1 if precision in ("bf16", "fp16") else 2
    activations = n_layer * tokens * (34 * d_model + 5 * n_head * context) * width
    logits = 2 * 4 * tokens * vocab
    return int(1.1 * (16 * params + activations + logits))


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a run on `device` now (None where it cannot be read)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    # MemAvailable counts reclaimable page cache, which sysconf's free pages leave out; psutil is no dependency
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# ---------------------------------------------------------------- speed probe

PROBE_SHARE = 0.05      # of a time budget the speed probe may take
PROBE_MAX_S = 30.0
PROBE_SHAPES = 3        # the best-ranked shapes probed
PROBE_WARMUP_STEPS = 2  # untimed: the allocator and the kernels' first calls
PROBE_MIN_S = 1.0       # a shape is not probed in less


def probe_speeds(ranked: list[dict], budget_s: float, *, vocab: int, device: torch.device, precision: str,
                 optim: str = "muon") -> dict:
    """Training tokens/s of the best-ranked shapes, measured by a few eager steps on this device and
    remembered per device and shape (the best seen, as device_peak does), within PROBE_SHARE of the budget
    and PROBE_MAX_S; a figure taken while the machine is busy is used but not remembered. Returns
    {(n_layer, d_model): tokens/s} for the shapes measured or remembered."""
    path = cache_dir() / "speed_probes.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    left = min(PROBE_SHARE * budget_s, PROBE_MAX_S)
    speeds, changed = {}, False
    shapes = [c for c in ranked if c["fits"]][:max(0, min(PROBE_SHAPES, int(left / PROBE_MIN_S)))]  # best first
    for i, c in enumerate(shapes):
        key = (f"{_device_key(device)}/{precision}/torch{torch.__version__}/{c['n_layer']}x{c['d_model']}h{c['n_head']}"
               f"/ctx{c['context']}/mb{c['micro_batch']}/v{math.ceil(vocab / 64) * 64}/{optim}")
        if key not in known:
            share = left / (len(shapes) - i)
            if share < PROBE_MIN_S:
                continue
            started = time.monotonic()
            measured = step_speed(c, vocab, device, precision, optim, share)
            left -= max(share, time.monotonic() - started)  # the share it was given, or what it overran
            if measured is None:
                continue
            speeds[(c["n_layer"], c["d_model"])] = measured
            if not machine_busy():  # a figure taken under other work is used now, not remembered
                known[key], changed = measured, True
            continue
        speeds[(c["n_layer"], c["d_model"])] = float(known[key])
    if changed:
        remember(path, known)
    return speeds


def step_speed(c: dict, vocab: int, device: torch.device, precision: str, optim: str, seconds: float) -> float | None:
    """Tokens/s of the fastest of eager training steps of shape `c` at its micro-batch, timed after
    PROBE_WARMUP_STEPS until `seconds` are spent (the fastest, as other work on the machine only slows
    steps down); None when not even one timed step fits."""
    # the run's random state stays as the run seeded it, probed or not
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(0)
        return _timed_steps(c, vocab, device, precision, optim, seconds)


def _timed_steps(c: dict, vocab: int, device: torch.device, precision: str, optim: str, seconds: float) -> float | None:
    started = time.monotonic()
    mc = ModelConfig(vocab_size=math.ceil(vocab / 64) * 64, context=c["context"], n_layer=c["n_layer"],
                     d_model=c["d_model"], n_head=c["n_head"], canon=0, dropout=0.0)
    model = GPT(mc).to(device)
    apply_kernels(model, device)
    optimizer = build_optimizer(model, optim, lr=1e-4, weight_decay=0.1, device=device, precision=precision)
    x = torch.randint(0, vocab, (c["micro_batch"], c["context"]), device=device)

    def step():
        with autocast(device, precision):
            loss = model(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(PROBE_WARMUP_STEPS):
        if time.monotonic() - started >= seconds:
            return None
        step()
    fastest = math.inf
    while time.monotonic() - started < seconds:
        begun = time.perf_counter()
        step()
        fastest = min(fastest, time.perf_counter() - begun)
    return x.numel() / fastest if fastest < math.inf else None


def machine_busy() -> bool:
    """Whether other work competes for this machine's cores now (the last minute's load average exceeds them)."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except (OSError, AttributeError):
        return False


def _device_key(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu{torch.get_num_threads()}"


def plan_on_device(budget_s: float | None, *, train_tokens: int, vocab: int, device: torch.device, precision: str,
                   micro_batch: int | None = None, budget_flops: float | None = None, optim: str = "muon",
                   probe: bool = True, clock=None, ladder: list | None = None,
                   peak_flops: float | None = None, arch: str = "gpt", mask_rate: float = MASK_RATE) -> Plan:
    """The plan for this device: its free memory caps the shapes, and with a time budget the best-ranked
    shapes' speed is probed here (cached) before the final ranking (a GPT's step is what the probe times, so
    other architectures keep the table's speeds). `clock()` gives the seconds of the budget left after the
    probe (default: `budget_s` less the probe's time)."""
    limit = available_memory(device)
    kwargs = {"train_tokens": train_tokens, "vocab": vocab, "device": device, "precision": precision,
              "micro_batch": micro_batch, "budget_flops": budget_flops, "memory_limit": limit, "optim": optim,
              "ladder": ladder, "arch": arch, "mask_rate": mask_rate}
    first = plan(budget_s, peak_flops=peak_flops, **kwargs)
    if not (probe and budget_s and arch == "gpt"):
        return first
    started = time.monotonic()
    ranked = sorted(first.candidates, key=lambda c: c["predicted_loss"])
    speeds = probe_speeds(ranked, budget_s, vocab=vocab, device=device, precision=precision, optim=optim)
    left = clock() if clock else budget_s - (time.monotonic() - started)
    return plan(left, peak_flops=first.peak_flops, speeds=speeds, **kwargs)


# ---------------------------------------------------------------- the plan as a record

PLAN_FORMAT = 1  # bumped when a field of plan_record changes meaning or goes away


def plan_record(planned: Plan | None, mc: ModelConfig, *, n_params: int, n_params_without_embedding: int,
                flops_per_token_: float, device: str, precision: str, compiled: bool, budget: dict, ema: float,
                data: dict, compile_reason: str | None = None, batch_tokens: int, micro_batch: int | None, micro_steps: int | None,
                lr: float, warmup: float, optim: str, schedule: str) -> dict:
    """The plan as plain data: what `budgetlm plan --json` prints and pretrain writes to plan.json
    (fields listed in docs/planner.md)."""
    p = planned
    speed = CANON_SPEED if mc.canon else 1.0  # the planned speeds were measured without Canon layers
    limits = [x for x in (budget.get("max_tokens"), budget.get("flops") and int(budget["flops"] / flops_per_token_)) if x]
    tokens = min([int(p.expected_tokens * speed), *limits]) if p else min(limits, default=None)
    if budget.get("max_steps"):
        tokens = min(tokens or math.inf, budget["max_steps"] * batch_tokens)
    steps = math.ceil(tokens / batch_tokens) if tokens else None
    warmup_steps = (round(warmup * steps) if warmup < 1 else int(warmup)) if steps else None
    regularizers = []
    if mc.dropout:
        why = (f"{p.expected_epochs:.1f} expected epochs > {REPEATS_BEFORE_DROPOUT:g}" if p and p.dropout == mc.dropout
               else "given")
        regularizers.append({"name": "dropout", "value": mc.dropout, "why": why})
    bpe = data.get("bpe_dropout") or 0.0
    if bpe:
        why = (f"{p.expected_epochs:.1f} expected epochs > {REPEATS_BEFORE_BPE_DROPOUT:g}"
               if p and p.bpe_dropout == bpe else "given")
        regularizers.append({"name": "bpe_dropout", "value": bpe, "passes": data.get("bpe_passes"), "why": why})
    averaged = f"{p.expected_epochs:.1f} expected epochs without them > {REPEATS_BEFORE_AVERAGE:g}" if p else ""
    if mc.canon:
        why = averaged if p and p.canon == mc.canon else "given"
        regularizers.append({"name": "canon", "value": mc.canon, "why": why})
    if ema:
        regularizers.append({"name": "ema", "value": ema, "why": averaged if p and p.ema == ema else "given"})
    return {
        "format": PLAN_FORMAT,
        "planned": p is not None,
        "device": device,
        "precision": precision,
        "compiled": compiled,
        "compile_reason": compile_reason,
        "matmul_peak_flops": p.peak_flops if p else None,
        "budget": budget,
        "data": data,
        "model": {**mc.to_dict(), "params": n_params, "params_without_embedding": n_params_without_embedding,
                  "flops_per_token": flops_per_token_},
        "training": {"tokens": tokens, "epochs": tokens / data["train_tokens"] if tokens and data.get("train_tokens")
                     else None, "batch_tokens": batch_tokens, "micro_batch": micro_batch, "micro_steps": micro_steps,
                     "steps": steps, "optimizer": optim, "lr": lr,
                     "lr_rule": "1.5e-3 x 256 / d_model x the optimizer's factor (not scaled with the batch)",
                     "schedule": schedule, "warmup_steps": warmup_steps,
                     "flops": tokens * flops_per_token_ if tokens else None,
                     "tokens_per_s": p.tokens_per_s * speed if p else None, "speed": p.speed if p else None},
        "memory": {"estimate_bytes": p.memory_bytes if p else None, "free_bytes": p.memory_limit if p else None,
                   "share_allowed": MEMORY_SHARE},
        "regularizers": regularizers,
        "ranking": {"by": "predicted_loss: the Chinchilla fit L(N, D) (Hoffmann et al. 2022) with repeated epochs "
                    "discounted (Muennighoff et al. 2023), nats per token on the fit's own data: it ranks shapes "
                    "and is not a forecast of this corpus' validation loss",
                    "predicted_loss": p.predicted_loss if p else None},
        "candidates": [{k: v for k, v in c.items()} for c in (p.candidates if p else [])],
    }


def plan_text(r: dict) -> str:
    """The plan record for people: each choice and its reason."""
    m, t, b, d = r["model"], r["training"], r["budget"], r["data"]
    limits = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in b.items() if v)
    peak = f", matmul peak {r['matmul_peak_flops'] / 1e9:,.0f} GFLOP/s" if r["matmul_peak_flops"] else ""
    lines = [f"plan ({'chosen by the planner' if r['planned'] else 'no plan: the shape was given'}), budget: {limits}",
             f"  device {r['device']}, {r['precision']}, {'compiled' if r['compiled'] else 'eager'}{peak}",
             *([f"  {r['compile_reason']}"] if r.get("compile_reason") else []),
             (f"  model {m['n_layer']}x{m['d_model']}, {m['n_head']} heads, context {m['context']}, vocabulary "
              f"{d['vocab_size']:,} (head {m['vocab_size']:,}): {m['params'] / 1e6:.2f}M parameters, "
              f"{m['params_without_embedding'] / 1e6:.2f}M without the embedding")]
    if t["tokens"]:
        epochs = f" = {t['epochs']:.1f} epochs of {d['train_tokens']:,}" if t["epochs"] else ""
        lines.append(f"  tokens {t['tokens']:,}{epochs}, {t['flops']:.3g} model FLOPs")
    micro = (f"micro-batch {t['micro_batch']} x {t['micro_steps']}" if t["micro_batch"]
             else "micro-batch: the largest that fits, found at the start")
    lines.append(f"  batch {t['batch_tokens']:,} tokens ({micro}), "
                 f"{t['steps'] if t['steps'] else '?'} steps")
    warm = f", warmup {t['warmup_steps']} steps" if t["warmup_steps"] is not None else ""
    lines.append(f"  {t['optimizer']} lr {t['lr']:.2e} ({t['lr_rule']}), {t['schedule']}{warm}")
    for g in r["regularizers"]:
        lines.append(f"  {g['name']} {g['value']:g}: {g['why']}")
    if not r["regularizers"]:
        lines.append("  no dropout, BPE-dropout, Canon layers or moving average: the text is not read often enough to "
                     "need them")
    if r["memory"]["estimate_bytes"]:
        free = r["memory"]["free_bytes"]
        lines.append(f"  memory: about {r['memory']['estimate_bytes'] / 2**20:,.0f} MiB a step"
                     + (f" of {free / 2**20:,.0f} MiB free" if free else ""))
    if r["planned"]:
        lines.append(f"  ranked by predicted loss (Chinchilla fit, not a forecast of this corpus' loss): "
                     f"{r['ranking']['predicted_loss']:.3f}")
        lines.append("  shape      context  params  tokens      epochs  pred.loss  tokens/s  speed     fits")
        for c in r["candidates"]:
            mark = "*" if (c["n_layer"], c["d_model"]) == (m["n_layer"], m["d_model"]) else " "
            lines.append(f" {mark}{c['n_layer']:>2}x{c['d_model']:<6} {c['context']:>7} {c['params'] / 1e6:6.2f}M "
                         f"{c['tokens']:>11,} {c['epochs']:7.1f} {c['predicted_loss']:9.3f} {c['tokens_per_s']:9,.0f}  "
                         f"{c['speed']:<9} {'yes' if c['fits'] else 'no'}")
    return "\n".join(lines)


def batch_settings(batch_tokens, micro_batch: int | None, context: int, planned: Plan | None) -> tuple[int, int | None]:
    """(tokens per optimizer step, sequences per forward pass) from the flags over the plan. The micro-batch is
    None for --batch-tokens auto: the largest that fits, found once the model is built."""
    asked = batch_tokens if isinstance(batch_tokens, int) else None
    if asked is not None:
        tokens = asked
    elif planned is not None and context == planned.context:
        tokens = planned.batch_tokens
    else:
        tokens = (micro_batch or 8) * context
    if micro_batch:
        return tokens, micro_batch
    if batch_tokens == "auto":
        return tokens, None
    micro = planned.micro_batch if planned else 8
    if asked is not None:  # a batch smaller than one planned micro-batch: fewer sequences per pass
        micro = max(1, min(micro, asked // context))
    return tokens, micro


def planned_lr(lr: float | None, d_model: int, batch_tokens: int, optim: str, planned: Plan | None) -> float:
    """--lr where given, else the plan's rate where the plan's width stands, else the rule at this width."""
    if lr:
        return lr
    if planned is not None and planned.d_model == d_model and planned.lr:
        return planned.lr
    return learning_rate(d_model, batch_tokens, optim)


# ---------------------------------------------------------------- what pretrain and plan share

def shape_given(m: ModelConfig) -> bool:
    """Whether flags fix the model's shape (then the planner does not pick it)."""
    return bool(m.size or m.n_layer or m.d_model or m.n_head)


def bpe_dropout_setting(d, tokenizer, planned: Plan | None) -> tuple[float, int]:
    """(rate, noisy passes) of BPE-dropout from the [data] settings `d`: the flags, else the plan; (0, 0) when off."""
    rate = given_or_planned(d.bpe_dropout, planned, "bpe_dropout", 0.0)
    if not rate:
        return 0.0, 0
    if not supports_bpe_dropout(tokenizer):
        if d.bpe_dropout:
            raise UserError("--bpe-dropout needs a BPE tokenizer, and --tokenizer gave another kind; "
                            "drop --bpe-dropout or use a BPE tokenizer")
        return 0.0, 0
    return rate, d.bpe_passes or bpe_passes(planned.expected_epochs if planned else None)


def budget_fields(t) -> dict:
    """The run's limits, as the plan record lists them."""
    return {"seconds": t.budget, "flops": t.budget_flops, "max_steps": t.max_steps, "max_tokens": t.max_tokens}


def data_fields(data, bpe_rate: float, passes: int) -> dict:
    """The prepared data (prepare.py), as the plan record lists it: the tokens encoded for this run and
    the whole training text's (estimated where only a part of a large corpus is encoded)."""
    return {"train_tokens": len(data.train_tokens), "corpus_train_tokens": data.unique_tokens,
            "val_tokens": len(data.val_tokens), "vocab_size": data.tokenizer.get_vocab_size(),
            "bpe_dropout": bpe_rate, "bpe_passes": passes}
