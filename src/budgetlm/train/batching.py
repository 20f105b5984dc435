"""`--batch-tokens auto`: the largest micro-batch that fits in memory.

The effective batch comes from the planner's rule (about 2,000 optimizer steps per run); this picks
how many sequences go through one forward pass. On CUDA it probes: forward and backward at doubling
micro-batches until one runs out of memory or passes 85% of the device's memory. On CPU, where a
probe that swaps would take minutes, it estimates activation memory per sequence and stays within half
of the RAM that is free."""

from __future__ import annotations

import os

import torch
from torch import nn


def _available_ram() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def activation_bytes_per_sequence(n_layer: int, d_model: int, context: int, vocab: int, n_head: int) -> int:
    """fp32 activations kept for backward, per sequence: about 34·T·d per layer for the matmul inputs,
    norms and MLP (Korthikanti et al. 2022, without recomputation), the attention output per head,
    and the logits with their softmax and gradient (3·T·V)."""
    per_layer = 34 * context * d_model + 5 * n_head * context
    return 4 * (n_layer * per_layer + 3 * context * vocab)


def largest_micro_batch(model: nn.Module, forward, context: int, vocab: int, batch_tokens: int,
                        device: torch.device, autocast) -> int:
    cap = max(1, batch_tokens // context)
    if device.type != "cuda":
        c = model.config
        per_seq = activation_bytes_per_sequence(c.n_layer, c.d_model, context, vocab, c.n_head)
        return max(1, min(cap, int(0.5 * _available_ram() // per_seq)))
    total = torch.cuda.get_device_properties(device).total_memory
    best, micro = 1, 1
    while micro <= cap:
        try:
            torch.cuda.reset_peak_memory_stats(device)
            x = torch.randint(0, vocab, (micro, context), device=device)
            with autocast():
                loss = forward(x, x)
            loss.backward()
            model.zero_grad(set_to_none=True)
            if torch.cuda.max_memory_allocated(device) > 0.85 * total:
                break
            best = micro
            micro *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    return best
