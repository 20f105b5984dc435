"""Kernel choices for a device, applied to a plain model from outside (the model files only say what
the network computes): attention written out in bf16 on a CPU, a cheaper dropout mask on a CPU, an fp32
key/value cache for CPU decoding. Each was measured to pay on the CPUs this project runs on
(docs/performance.md); elsewhere the model keeps PyTorch's own kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from budgetlm.models.blocks import Attention, attend, compute_dtype

# In bf16 on a CPU, sdpa's flash kernel ran at about a sixth of the matmul peak at context 256 (profiled), and its
# math path converts q, k and v to fp32 first. Written out in bf16 (softmax accumulating in fp32 inside), attention
# of (8, 6, 256, 64) took 10.4 ms forward and backward against 19.0 (flash) and 26.1 (math) (docs/performance.md).
# Its score matrix grows with the square of the length, so only for short sequences.
CPU_PLAIN_ATTENTION_MAX_LEN = 256


def use_plain_attention(q: torch.Tensor, key_length: int) -> bool:
    """Whether to write attention out (plain_attention) rather than call sdpa: bf16 on a CPU, short sequences."""
    return (q.device.type == "cpu" and key_length <= CPU_PLAIN_ATTENTION_MAX_LEN
            and compute_dtype(q) == torch.bfloat16)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                    dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v over (batch, heads, time, head_dim), queries and keys of equal length, no padding."""
    # scaling q rather than the scores, and adding the mask rather than filling it, touch fewer elements:
    # about 15% less time forward and backward at (8, 6, 256, 64)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if causal:
        t = q.shape[-2]
        scores = scores + torch.full((t, t), float("-inf"), dtype=scores.dtype, device=q.device).triu(1)
    probs = F.dropout(scores.softmax(dim=-1), dropout_p) if dropout_p else scores.softmax(dim=-1)
    return probs.to(v.dtype) @ v


@torch.library.custom_op("budgetlm::keep_lanes", mutates_args=())
def keep_lanes(x: torch.Tensor, threshold: int) -> torch.Tensor:
    """Which elements of `x` dropout keeps: 64 random bits cut into four 16-bit lanes, each kept where it reads
    at least `threshold` of 65536. An opaque op, so a compiled graph calls it as it is: Inductor's own
    per-element draw made a compiled dropout 2.6x slower (docs/performance.md)."""
    words = torch.randint(-(2**63), 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64, device=x.device)
    return words.view(torch.int16)[: x.numel()].view(x.shape) >= threshold - 32768


@keep_lanes.register_fake
def _keep_lanes_shape(x: torch.Tensor, threshold: int) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.bool, device=x.device)


class FastCPUDropout(nn.Dropout):
    """nn.Dropout with a mask drawn four elements at a time on a CPU, eager or compiled.

    PyTorch's CPU dropout draws one random number per element (bernoulli_, about 8 ns each here: 14 ms of a
    130 ms training step of a 4×128 GPT); this draws 64 random bits and cuts them into four 16-bit lanes, each
    compared with the rate, so the rate is rounded to a multiple of 1/65536 and the kept values are scaled
    by that rate's 1/(1-p). About half the time of F.dropout, forward and backward (docs/performance.md).
    On a GPU it is nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not 0 < self.p < 1 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        threshold = round(self.p * 65536)  # drop a lane when its 16 bits, read as 0..65535, fall below this
        keep = keep_lanes(x.detach(), threshold)
        return x * keep.to(x.dtype).mul_(1 / (1 - threshold / 65536))


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                  mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """blocks.attend, written out where that is faster on a CPU (bf16, short sequences, no mask)."""
    if mask is None and q.shape[-2] == k.shape[-2] and use_plain_attention(q, k.shape[-2]):
        return plain_attention(q, k, v, causal=causal, dropout_p=dropout_p)
    return attend(q, k, v, causal=causal, mask=mask, dropout_p=dropout_p)


def apply_kernels(model: nn.Module, device: torch.device) -> nn.Module:
    """Give `model` the kernels that run fastest on `device`; a no-op off the CPU."""
    if device.type != "cpu":
        return model
    for module in list(model.modules()):
        if isinstance(module, Attention):
            module.kernel = cpu_attention
        if hasattr(module, "written_attention"):  # a Hugging Face encoder (models/hf_encoder.py)
            module.written_attention = use_plain_attention
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                setattr(module, name, FastCPUDropout(child.p, child.inplace))
    return model


def cache_dtype(device: torch.device, weights: torch.dtype) -> torch.dtype:
    """The dtype of a decoding key/value cache. On a CPU fp32 whatever the weights' dtype: sdpa's bf16 path there
    converts every cached key and value to fp32 at every step, and one query over an fp32 cache ran 5× faster
    (10 against 50 µs a layer at 200 positions)."""
    return torch.float32 if device.type == "cpu" else weights
