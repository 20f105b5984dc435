"""Temperature scaling (Guo et al. 2017): one scalar that divides a language model's logits, fitted on held-out text.

A model that reads its training text many times grows overconfident: after twelve epochs of tinyshakespeare its
logits divided by about 1.1 predict the validation text 0.008–0.010 bits per byte better (docs/planner.md). The
temperature is fitted by Newton's method on β = 1/T, in which the loss is convex, over the final hidden states of
held-out positions. The figure reported for it is cross-fitted: the validation windows alternate between two
halves, and each half is scored at the temperature fitted on the other, so no position is scored by a
temperature fitted on it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from budgetlm.data.tokens import eval_windows

FIT_POSITIONS = 8192      # held-out positions the fits read (both halves): one scalar needs few
BLOCK_ELEMENTS = 2**22    # logits per block of the fit: 16 MB in fp32
BETA_RANGE = (0.25, 4.0)  # temperatures between 0.25 and 4


@dataclass
class Calibration:
    temperature: float    # fitted on both halves: the one to keep
    val_loss: float       # cross-fitted, nats per token
    val_bpb: float
    raw_val_loss: float   # at the model's temperature before the fit
    raw_val_bpb: float
    half_temperatures: tuple[float, float]


def fit_inverse_temperature(model, hidden: torch.Tensor, targets: torch.Tensor, steps: int = 10,
                            tol: float = 1e-5) -> tuple[float, float]:
    """(β, curvature at β) minimizing Σ_rows logsumexp(β·z) − β·z[target] over the rows of `hidden` (positions,
    d_model), z = model.logits(row). Newton's method: the gradient is Σ E_β[z] − z[target] and the curvature
    Σ Var_β[z] ≥ 0."""
    beta, curvature = 1.0, 0.0
    block = max(1, BLOCK_ELEMENTS // model.config.vocab_size)
    for _ in range(steps):
        gradient, curvature = 0.0, 0.0
        for start in range(0, len(hidden), block):
            z = model.logits(hidden[start : start + block]).float()
            p = torch.softmax(z * beta, dim=-1)
            mean = (p * z).sum(-1)
            gradient += float((mean - z.gather(1, targets[start : start + block, None]).squeeze(1)).sum())
            curvature += float((p * (z - mean[:, None]).square()).sum())
        if curvature <= 0:
            break
        step = gradient / curvature
        beta = min(max(beta - step, BETA_RANGE[0]), BETA_RANGE[1])
        if abs(step) < tol:
            break
    return beta, curvature


def calibrate(model, tokens: np.ndarray, n_bytes: int, context: int, batch: int,
              device: torch.device) -> Calibration:
    """Fit the temperature of `model` (a GPT, in eval mode) on the token stream `tokens` of `n_bytes` UTF-8 bytes,
    read in the non-overlapping windows of `evaluate_lm`; the model is left unchanged. Call under no_grad, in
    the precision the model is evaluated in."""
    total_positions = len(tokens) - 1
    every = max(1, math.ceil(total_positions / FIT_POSITIONS))  # fit on every n-th batch of windows
    hidden: list[list[torch.Tensor]] = [[], []]
    targets: list[list[torch.Tensor]] = [[], []]
    for i, (x, y) in enumerate(eval_windows(tokens, context, batch)):
        if i % every:
            continue
        h = model.hidden(x.to(device))
        y = y.to(device)
        for half in (0, 1):
            rows = y[half::2] != -100
            hidden[half].append(h[half::2][rows])
            targets[half].append(y[half::2][rows])
    fits = [fit_inverse_temperature(model, torch.cat(hidden[half]), torch.cat(targets[half])) for half in (0, 1)]
    del hidden, targets

    # each half scored at the other's temperature
    cross_nats = raw_nats = 0.0
    other = torch.tensor([fits[1][0], fits[0][0]], device=device)
    for x, y in eval_windows(tokens, context, batch):
        y = y.to(device)
        z = model.logits(model.hidden(x.to(device))).float()
        beta = other[torch.arange(len(y), device=device) % 2][:, None, None]
        cross_nats += float(F.cross_entropy((z * beta).flatten(0, 1), y.flatten(), reduction="sum"))
        raw_nats += float(F.cross_entropy(z.flatten(0, 1), y.flatten(), reduction="sum"))
    # one temperature from both halves: their Newton steps combined, weighted by curvature
    (beta_a, curv_a), (beta_b, curv_b) = fits
    beta = (beta_a * curv_a + beta_b * curv_b) / (curv_a + curv_b) if curv_a + curv_b > 0 else 1.0
    per_bit = 1 / (n_bytes * math.log(2))
    now = model.config.temperature
    return Calibration(temperature=now / beta, val_loss=cross_nats / total_positions, val_bpb=cross_nats * per_bit,
                       raw_val_loss=raw_nats / total_positions, raw_val_bpb=raw_nats * per_bit,
                       half_temperatures=(now / beta_a, now / beta_b))
