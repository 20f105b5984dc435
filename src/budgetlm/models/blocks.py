"""Transformer building blocks shared by every model family (GPT now; BERT and T5 reuse them).

Pre-norm residual blocks with RMSNorm, rotary position embeddings, QK-norm, no biases, and
attention through `scaled_dot_product_attention`. Where and how fast it runs is not decided here: the
runtime (train/kernels.py) may give an attention layer another kernel computing the same thing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: the autocast dtype where autocast is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, mask: torch.Tensor | None = None,
           dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q·kᵀ/√d + mask)·v over (batch, heads, time, head_dim), through sdpa. With a cache, queries
    may be fewer than keys: the causal mask is then aligned to the end, which sdpa's is_causal does not do."""
    is_causal = causal and mask is None and q.shape[-2] == k.shape[-2]
    if causal and not is_causal and q.shape[-2] > 1 and mask is None:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril(k.shape[-2] - q.shape[-2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021): rotates pairs of channels by position-dependent angles."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        # Not saved with the weights: they are a pure function of the config.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def tables(self, offset: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions offset … offset+length-1, shaped (time, 1, head_dim/2) to
        broadcast over (batch, time, heads, head_dim/2). Cut once per forward and shared by every layer."""
        cos = self.cos[offset : offset + length, None].to(dtype)
        sin = self.sin[offset : offset + length, None].to(dtype)
        return cos, sin

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (batch, time, heads, head_dim)."""
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """Keys and values of past positions for one attention layer, preallocated to the context length,
    and the last inputs of the layer's Canon mixes (their window reaches back a few positions)."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, n_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0
        self.canon_inputs: dict[str, torch.Tensor] = {}
        self.memory: tuple[torch.Tensor, torch.Tensor] | None = None  # a decoder's projected encoder memory

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[-2]
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Canon(nn.Module):
    """A causal mix of each position with the `kernel - 1` before it, per channel, plus the position itself:
    x_t + Σ_j w_j ⊙ x_(t-j) ("Canon layers", Allen-Zhu 2025). Attention in a small, shallow model learns slowly
    to read the previous few tokens; this reads them directly, for 2·kernel·d_model FLOPs a token. The weights
    start at zero, so it starts as the identity. On tinyshakespeare at 5 minutes, before attention and MLP in
    every block, with a moving average of the weights: 2.002 bits per byte over three seeds against 2.011 without
    (docs/planner.md)."""

    def __init__(self, d_model: int, kernel: int = 4):
        super().__init__()
        if kernel < 2:
            raise ValueError(f"a Canon mix needs a kernel of at least 2 positions, got {kernel}")
        self.weight = nn.Parameter(torch.zeros(kernel, d_model))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, name: str = "") -> torch.Tensor:
        """x: (batch, time, d_model). With a cache, the inputs of earlier calls under `name` are the
        positions before x's first."""
        if cache is None:
            return self.mix(x)
        before = cache.canon_inputs.get(name)
        full = x if before is None else torch.cat((before, x), dim=1)
        cache.canon_inputs[name] = full[:, -(self.weight.shape[0] - 1):]
        return self.mix(full)[:, -x.shape[1]:]

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        return _CanonMix.apply(x, self.weight)


class _CanonMix(torch.autograd.Function):
    """x + Σ_j w_j ⊙ x shifted j positions later, in place on shifted slices (no padded copies). The backward
    is written out: autograd's record of the in-place slice writes made forward and backward take twice as
    long (docs/performance.md)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        w = weight.to(x.dtype)
        out = torch.addcmul(x, x, w[0])
        for j in range(1, min(len(w), x.shape[1])):
            out[:, j:].addcmul_(x[:, :-j], w[j])
        ctx.save_for_backward(x, w)
        ctx.weight_dtype = weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = ctx.saved_tensors
        grad_x = torch.addcmul(grad, grad, w[0])
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)  # taps past a short sequence stay 0
        grad_w[0] = (grad * x).sum((0, 1), dtype=torch.float32)
        for j in range(1, min(len(w), x.shape[1])):
            grad_x[:, :-j].addcmul_(grad[:, j:], w[j])
            grad_w[j] = (grad[:, j:] * x[:, :-j]).sum((0, 1), dtype=torch.float32)
        return grad_x, grad_w.to(ctx.weight_dtype)


class Attention(nn.Module):
    """Multi-head self-attention (causal or bidirectional), or cross-attention when `memory` is given
    (`cross=True`; then a cache holds the projected memory, not past positions)."""

    def __init__(self, d_model: int, n_head: int, *, causal: bool, dropout: float = 0.0,
                 qk_norm: bool = True, cross: bool = False):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} is not divisible by n_head {n_head}")
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.causal, self.dropout, self.qk_norm = causal, dropout, qk_norm
        self.kernel = attend  # the runtime may swap in another implementation of the same function
        if cross:  # queries from x, keys and values from the encoder's memory
            self.q = nn.Linear(d_model, d_model, bias=False)
            self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        else:  # one matmul for all three
            self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        if qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor, *, memory: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`rope`: the rotary tables for x's positions (Rotary.tables), for self-attention."""
        b, t, d = x.shape
        h, hd = self.n_head, self.head_dim
        if memory is None:
            # queries and keys side by side (batch, time, 2·heads, head_dim): normalized and rotated
            # together, half the small ops of doing each apart (they dominate a one-token decode step)
            qkv = self.qkv(x).view(b, t, 3 * h, hd)
            qk, v = qkv[:, :, : 2 * h], qkv[:, :, 2 * h :]
            if self.qk_norm:
                weight = torch.cat((self.q_norm.weight.expand(h, hd), self.k_norm.weight.expand(h, hd)))
                # back to v's dtype: under autocast the norm computes in fp32, and sdpa would cast anyway
                qk = (F.rms_norm(qk, (hd,), eps=self.q_norm.eps) * weight).to(v.dtype)
            if rope is not None:
                qk = Rotary.rotate(qk, *rope)
            q, k = qk.split(h, dim=2)
        else:
            return self._cross(x, memory, mask, cache)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (batch, heads, time, head_dim)
        if cache is not None:
            k, v = cache.append(k, v)
            q = q.to(k.dtype)  # the cache may hold a wider dtype than the weights
        y = self.kernel(q, k, v, causal=self.causal, mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d).to(x.dtype))

    def _cross(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None,
               cache: KVCache | None) -> torch.Tensor:
        """Attention from x to the encoder's memory. With a cache, the memory's keys and values are
        projected once, at the first decoding step, and read from the cache after."""
        b, t, d = x.shape
        h, hd = self.n_head, self.head_dim
        q = self.q(x).view(b, t, h, hd)
        if self.qk_norm:
            q = _head_norm(q, self.q_norm)
        if cache is not None and cache.memory is not None:
            k, v = cache.memory
        else:
            k, v = self.kv(memory).view(b, memory.shape[1], 2 * h, hd).split(h, dim=2)
            if self.qk_norm:
                k = _head_norm(k, self.k_norm)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            if cache is not None:
                cache.memory = (k.to(cache.k.dtype), v.to(cache.k.dtype))
        q = q.transpose(1, 2).to(k.dtype)
        y = self.kernel(q, k, v, causal=False, mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d).to(x.dtype))


def _head_norm(x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    """norm(x) in x's dtype. Under autocast x is bf16 and the weight fp32, a pair rms_norm has no fused kernel for
    (a small T5's forward spent 38 ms in its norms that way, 6 ms this way): normalize without the weight, then
    multiply, as self-attention does."""
    return (F.rms_norm(x, (x.shape[-1],), eps=norm.eps) * norm.weight).to(x.dtype)


class MLP(nn.Module):
    """Feed-forward layer: ReLU² (Primer, So et al. 2021) or SwiGLU (Shazeer 2020)."""

    def __init__(self, d_model: int, hidden: int, kind: str = "relu2"):
        super().__init__()
        if kind not in ("relu2", "swiglu"):
            raise ValueError(f"unknown mlp kind {kind!r}: use relu2 or swiglu")
        self.kind = kind
        self.up = nn.Linear(d_model, hidden * (2 if kind == "swiglu" else 1), bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.relu(h).square()
        return self.down(h)


class Block(nn.Module):
    """Pre-norm Transformer block: self-attention, optional cross-attention (T5 decoder), MLP."""

    def __init__(self, d_model: int, n_head: int, mlp_hidden: int, *, causal: bool, mlp: str = "relu2",
                 dropout: float = 0.0, attention_dropout: float = 0.0, qk_norm: bool = True,
                 cross_attention: bool = False, canon: int = 0, eps: float = 1e-6):
        """`dropout` on the residual branches, `attention_dropout` on the attention probabilities, `canon`:
        the kernel of a Canon mix (causal models only) of the attention's and the MLP's inputs (0: none)."""
        super().__init__()
        if canon and not causal:
            raise ValueError("Canon mixes read earlier positions only: they are for causal blocks")
        self.canon_attn = Canon(d_model, canon) if canon else None
        self.canon_mlp = Canon(d_model, canon) if canon else None
        self.attn_norm = RMSNorm(d_model, eps)
        self.attn = Attention(d_model, n_head, causal=causal, dropout=attention_dropout, qk_norm=qk_norm)
        self.cross_norm = RMSNorm(d_model, eps) if cross_attention else None
        self.cross = Attention(d_model, n_head, causal=False, dropout=attention_dropout, qk_norm=qk_norm,
                                cross=True) if cross_attention else None
        self.mlp_norm = RMSNorm(d_model, eps)
        self.mlp = MLP(d_model, mlp_hidden, mlp)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # no op calls when off

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        h = self.attn_norm(x)
        if self.canon_attn is not None:
            h = self.canon_attn(h, cache, "attn")
        x = x + self.drop(self.attn(h, mask=mask, cache=cache, rope=rope))
        if self.cross is not None:
            x = x + self.drop(self.cross(self.cross_norm(x), memory=memory, mask=memory_mask, cache=cache))
        h = self.mlp_norm(x)
        if self.canon_mlp is not None:
            h = self.canon_mlp(h, cache, "mlp")
        return x + self.drop(self.mlp(h))


def init_weights(module: nn.Module, n_layer: int, std: float = 0.02) -> None:
    """GPT-2 style init of weight matrices; residual output projections are scaled by 1/sqrt(2·n_layer)
    so the residual stream's variance does not grow with depth. Canon mixes keep their zeros."""
    for name, p in module.named_parameters():
        if p.dim() < 2 or ".canon_" in f".{name}":
            continue
        scale = 1.0 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight", "down.weight")) else 1.0
        nn.init.normal_(p, mean=0.0, std=std * scale)
