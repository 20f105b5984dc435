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

from budgetlm.models.config import SIZES, ModelConfig
from budgetlm.models.bert import MASK_RATE
from budgetlm.models.t5 import encoder_decoder_flops
from budgetlm.train.runtime import precision_dtype

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
# Further on, the training text is also re-segmented by BPE-dropout (data/tokens.py): at 8.9 epochs
# (tinyshakespeare, 5 minutes) 2.086 → 2.040–2.057 bpb with 4 noisy passes, while at 4.2 epochs (the
# SST-2 sentences, 10 minutes) it cost 0.99 → 1.17 (docs/planner.md); the threshold lies between.
# 8 and 10 passes and rate 0.2 were no better. Each pass is a copy of the token stream.
REPEATS_BEFORE_BPE_DROPOUT = 6.0
REPEAT_BPE_DROPOUT = 0.1
MAX_BPE_PASSES = 4
# A moving average of the weights (--ema 0.998) and Canon layers (--canon 4) are flags, not planned: at 5 minutes
# each beat its absence on tinyshakespeare (about 10 epochs) but not on WikiText-2 (about 3.5 epochs, forced on),
# paired by seed over three seeds (docs/planner.md, "A moving average of the weights, and Canon layers").


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
        regularized = f", {' and '.join(against)} against memorizing" if against else ""
        return (f"planned {self.n_layer}×{self.d_model} at context {self.context}, batch {self.batch_tokens} tokens, "
                f"about {self.expected_tokens / 1e6:.1f}M training tokens ({self.expected_epochs:.1f} epochs) in the "
                f"budget{regularized} (matmul peak {self.peak_flops / 1e9:.0f} GFLOP/s)")


def device_peak(device: torch.device, dtype: torch.dtype) -> float:
    """The matmul peak of this device, measured now and remembered as the best seen on this machine,
    so that a moment of load elsewhere does not change the plan (plans stay repeatable)."""
    from budgetlm.data.tokens import cache_dir

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu{torch.get_num_threads()}"
    key = f"{name}/{dtype}/torch{torch.__version__}"
    path = cache_dir() / "device_peaks.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    peak = max(matmul_peak(device, dtype), float(known.get(key, 0.0)))
    if peak != known.get(key):
        known[key] = peak
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(known, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs repeatability
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


def plan(budget_s: float, *, train_tokens: int, vocab: int, device: torch.device, precision: str,
         micro_batch: int | None = None, peak_flops: float | None = None, arch: str = "gpt",
         mask_rate: float = MASK_RATE) -> Plan:
    """The ladder shape with the lowest predicted loss after `budget_s` seconds of training; every architecture
    by the same rule, with its own parameter count and FLOPs per token."""
    peak = peak_flops or device_peak(device, precision_dtype(precision))
    best = None
    for n_layer, d_model, n_head in LADDER:
        body = body_params(n_layer, d_model, arch)
        n_params = body + vocab * d_model  # every parameter, as Chinchilla counts them
        if best is not None and body > MAX_PARAMS_PER_TOKEN * train_tokens:
            break
        context = context_for(d_model)
        tokens = (efficiency(d_model, device, precision) * peak * budget_s * OVERHEAD
                  / flops_per_token(n_layer, d_model, vocab, context, arch=arch, mask_rate=mask_rate))
        loss = predicted_loss(n_params, tokens, train_tokens)
        if best is None or loss < best[0]:
            best = (loss, n_layer, d_model, n_head, context, tokens)
    _, n_layer, d_model, n_head, context, tokens = best
    micro = micro_batch or (8 if device.type == "cpu" else max(8, 32768 // context))
    batch = max(micro * context, 2 ** round(math.log2(max(tokens / STEPS_TARGET, 1))))
    batch = micro * context * max(1, round(batch / (micro * context)))
    epochs = tokens / max(train_tokens, 1)
    repeated = epochs > REPEATS_BEFORE_DROPOUT
    return Plan(n_layer, d_model, n_head, context, batch, micro, int(tokens), peak, epochs,
                REPEAT_DROPOUT if repeated else 0.0,
                REPEAT_BPE_DROPOUT if epochs > REPEATS_BEFORE_BPE_DROPOUT else 0.0)


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
        canon=m.canon or 0,
        dropout=given_or_planned(m.dropout, planned, "dropout", 0.0),
    )
