"""Cross-entropy through the output head, a block of rows at a time.

The plain path holds the logits of every position three times (in the compute dtype, in fp32, and
their log-softmax for the backward pass): at 2,048 positions and a vocabulary of 8,192 that is about
160 MB written and read again every step. Here each block's logits live only while that block's gradients
are formed, during the forward pass, and the backward pass just scales the stored gradients. Without
gradients (evaluation) a block's logits live only while its rows' log-sum-exp is taken.
Hand-written because PyTorch has no fused linear + cross-entropy on CPU."""

from __future__ import annotations

from typing import Callable

import torch

from budgetlm.models.blocks import compute_dtype

BLOCK_ELEMENTS = 2**22  # logits per block: 16 MB in fp32
# forward only, smaller blocks stay in cache: at 2,048 positions × 16,384 tokens in bf16 on one core, 110 ms
# in blocks of 64 rows against 132 in blocks of 256 and 243 for the plain path (the matmul alone: 63)
FORWARD_BLOCK_ELEMENTS = 2**20

BlockGradients = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float],
                          tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def block_gradients(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block of rows of LinearCrossEntropy: the summed loss of rows h (rows, d) against targets (-100
    ignored), reduced in fp32 (fp64 when given fp64), and its gradients for h and for weight (vocab, d), in
    their dtype. A function of its own so that a compiled training step can compile it (train/compile.py)."""
    vocab = weight.shape[0]
    wide = torch.promote_types(h.dtype, torch.float32)
    valid = targets != -100
    index = targets.clamp(min=0)[:, None]
    # softmax written out so that exp runs once over the block, in place: logsumexp would take its
    # own exp of a copy of the logits
    logits = (h @ weight.T).to(wide)
    shifted = logits.sub_(logits.amax(dim=-1, keepdim=True))
    # the smoothed target puts 1 - smoothing on the label and smoothing / vocab on every token
    target = shifted.gather(1, index).squeeze(1) * (1 - smoothing)
    if smoothing:
        target += shifted.mean(dim=-1) * smoothing
    grad = shifted.exp_()
    norm = grad.sum(dim=-1)
    total = ((norm.log() - target) * valid).sum()
    # d(loss)/d(logits) = softmax - smoothed target, zero on ignored rows
    if torch.compiler.is_compiling():
        # compiled: a comparison with the label fuses into the one pass that writes the gradient in h's dtype, where
        # scatter_add_ would make Inductor write the fp32 gradient out and read it back
        label = torch.arange(vocab, device=h.device) == index
        grad = (grad * (1 / norm)[:, None] - label * (1 - smoothing) - smoothing / vocab) * valid[:, None]
    else:
        grad.mul_((valid / norm)[:, None])
        grad.scatter_add_(1, index, -(1 - smoothing) * valid[:, None].to(grad.dtype))
        if smoothing:
            grad.sub_((smoothing / vocab) * valid[:, None])
    grad = grad.to(h.dtype)
    return total, grad @ weight, grad.T @ h


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(hidden @ weight.T, targets, label_smoothing=smoothing); targets of -100
    are ignored. hidden (rows, d) and weight (vocab, d) must share a dtype; logits are reduced in fp32.
    `blocks` runs one block of rows (block_gradients, or a compiled copy of it)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                smoothing: float = 0.0, blocks: BlockGradients = block_gradients) -> torch.Tensor:
        rows, vocab = hidden.shape[0], weight.shape[0]
        block = max(1, BLOCK_ELEMENTS // vocab)
        wide = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 when given fp64
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device)
        total = torch.zeros((), dtype=wide, device=hidden.device)
        for start in range(0, rows, block):
            part = slice(start, start + block)
            nats, grad_hidden[part], block_grad_weight = blocks(hidden[part], weight, targets[part], smoothing)
            total += nats
            grad_weight += block_grad_weight
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_total.to(grad_hidden.dtype), grad_weight * grad_total.to(grad_weight.dtype),
                None, None, None)


def row_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      smoothing: float = 0.0) -> torch.Tensor:
    """Forward only: cross_entropy(hidden @ weight.T, targets, label_smoothing=smoothing, reduction="none") for
    hidden (rows, d), 0 where the target is -100; logits in hidden's dtype, reduced in fp32."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    block = max(1, FORWARD_BLOCK_ELEMENTS // vocab)
    wide = torch.promote_types(hidden.dtype, torch.float32)
    nats = torch.empty(rows, dtype=wide, device=hidden.device)
    for start in range(0, rows, block):
        h, t = hidden[start : start + block], targets[start : start + block]
        logits = (h @ weight.T).to(wide)
        peak = logits.amax(dim=-1)
        target = logits.gather(1, t.clamp(min=0)[:, None]).squeeze(1) * (1 - smoothing)
        if smoothing:
            target += logits.mean(dim=-1) * smoothing
        # exp in place over the block: logsumexp would take its own exp of a copy
        norm = logits.sub_(peak[:, None]).exp_().sum(dim=-1)
        nats[start : start + block] = (norm.log() + peak - target) * (t != -100)
    return nats


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         reduction: str = "mean", label_smoothing: float = 0.0,
                         blocks: BlockGradients = block_gradients) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets, label_smoothing=…) for hidden (..., d), in the autocast dtype
    when autocast is on; reduction "mean" (over targets that are not -100) or "sum", or "none" (one value a
    position, flattened) where no gradient is taken. With gradients, `blocks` forms a block of rows' loss and
    gradients (block_gradients or a compiled copy)."""
    dtype = compute_dtype(hidden)
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(hidden.device.type, enabled=False):
        if needs_grad:
            total = LinearCrossEntropy.apply(hidden.to(dtype), weight.to(dtype), targets, label_smoothing, blocks)
        else:
            nats = row_cross_entropy(hidden.to(dtype), weight.to(dtype), targets, label_smoothing)
            if reduction == "none":
                return nats
            total = nats.sum()
    if reduction == "sum":
        return total
    return total / (targets != -100).sum().clamp(min=1)
