"""What the three language models (gpt.py, bert.py, t5.py) share around the Transformer body (blocks.py): the
config a built model holds, and the tied head: logits without targets, the loss with them."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from budgetlm.models.config import ModelConfig
from budgetlm.models.loss import linear_cross_entropy


def built_config(config: ModelConfig, name: str) -> ModelConfig:
    """`config` as a built model holds (and saves) it: its whole shape given, and what the plan may leave unset
    (dropout, Canon mixes) off. `name` ("a GPT") names the model in the error."""
    if config.missing():
        raise ValueError(f"{name} needs its whole shape; unset: {', '.join(config.missing())}")
    return dataclasses.replace(config, dropout=config.dropout or 0.0, canon=config.canon or 0)


class LanguageModel(nn.Module):
    """A model whose token embedding `embed` is also its output head (tied)."""

    config: ModelConfig
    embed: nn.Embedding

    def head(self, h: torch.Tensor, targets: torch.Tensor | None, *, reduction: str = "mean",
             label_smoothing: float = 0.0) -> torch.Tensor:
        """Logits (..., vocab) of the final hidden states `h` without targets; with targets, the cross-entropy
        loss in nats (`reduction` as in F.cross_entropy; targets of -100 are ignored)."""
        if targets is None:
            return self.logits(h)
        return self.loss(h, targets, reduction=reduction, label_smoothing=label_smoothing)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.embed.weight)

    def loss(self, h: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean",
             label_smoothing: float = 0.0) -> torch.Tensor:
        """Cross-entropy over the positions with a target (not -100), gathered before the head: only they reach
        the vocabulary projection (a masked or span model predicts a small share of its positions). Block-wise
        (models/loss.py: no logits of every row at once) except for per-position losses with gradients."""
        picked = targets != -100
        h, targets = h[picked], targets[picked]
        if reduction in ("mean", "sum") or not torch.is_grad_enabled():
            return linear_cross_entropy(h, self.embed.weight, targets, reduction, label_smoothing)
        return F.cross_entropy(self.logits(h).float(), targets, reduction=reduction, label_smoothing=label_smoothing)

    def num_params(self, embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embedding else n - self.embed.weight.numel()

    def cast_weights(self, dtype: torch.dtype) -> LanguageModel:
        """Weights in `dtype` for inference (decoding reads every weight once per token, so bf16 halves
        the bytes it waits for); unlike `.to(dtype)` the rotary tables stay fp32."""
        for p in self.parameters():
            p.data = p.data.to(dtype)
        return self
