"""GPT: a decoder-only Transformer language model, in the spirit of nanoGPT's model.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from budgetlm.models.base import LanguageModel, built_config
from budgetlm.models.blocks import Block, KVCache, RMSNorm, Rotary, compute_dtype, init_weights
from budgetlm.models.config import ModelConfig
from budgetlm.models.loss import BlockGradients, block_gradients, linear_cross_entropy


class GPT(LanguageModel):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = built_config(config, "a GPT")
        dropout = c.dropout
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rotary = Rotary(c.head_dim, c.context, c.rope_base)
        self.blocks = nn.ModuleList(
            Block(c.d_model, c.n_head, c.mlp_hidden, causal=True, mlp=c.mlp, dropout=dropout,
                  attention_dropout=dropout if c.attention_dropout is None else c.attention_dropout,
                  qk_norm=c.qk_norm, canon=c.canon)
            for _ in range(c.n_layer)
        )
        self.norm = RMSNorm(c.d_model)
        self.output_kernel: nn.Module | None = None  # the tied head's product, if the runtime packs it
        self.loss_blocks: BlockGradients = block_gradients  # the training loss's block step; compiled with the blocks
        init_weights(self, c.n_layer)

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6·N for the matmuls (incl. the tied output head) plus attention
        scores and values (PaLM, appendix B): 12·layers·d_model·context."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.d_model * c.context

    def hidden(self, idx: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Final normalized hidden states, (batch, time, d_model)."""
        x = self.drop(self.embed(idx))
        offset = caches[0].length if caches is not None else 0
        rope = self.rotary.tables(offset, idx.shape[1], compute_dtype(x))
        for i, block in enumerate(self.blocks):
            x = block(x, cache=caches[i] if caches is not None else None, rope=rope)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        c = self.config
        if not c.logit_softcap:
            h = self._tempered(h)
        # tied input/output embedding
        logits = self.output_kernel(h) if self.output_kernel is not None else F.linear(h, self.embed.weight)
        if c.logit_softcap > 0:
            logits = c.logit_softcap * torch.tanh(logits / c.logit_softcap)
            if c.temperature != 1:
                logits = logits / c.temperature
        return logits

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, reduction: str = "mean",
                label_smoothing: float = 0.0, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Logits (batch, time, vocab) without targets; with targets, the cross-entropy loss in
        nats (`reduction` as in F.cross_entropy; targets of -100 are ignored)."""
        if idx.shape[1] > self.config.context and caches is None:
            raise ValueError(f"sequence of {idx.shape[1]} tokens exceeds the context of {self.config.context}")
        return self.head(self.hidden(idx, caches), targets, reduction=reduction, label_smoothing=label_smoothing)

    def loss(self, h: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean",
             label_smoothing: float = 0.0) -> torch.Tensor:
        """Cross-entropy of the next-token predictions read from hidden states `h` (see `forward`)."""
        # Block-wise loss in training (+12-15% tokens/s in bf16, +4% in fp32, less memory; a compiled training
        # step compiles its block step, train/compile.py) and evaluation (about twice as fast, models/loss.py).
        # Inside a compiled graph (a whole model compiled) Inductor fuses the plain path itself.
        blockwise_reduction = reduction in ("mean", "sum") or not torch.is_grad_enabled()
        if blockwise_reduction and not torch.compiler.is_compiling() and not self.config.logit_softcap:
            return linear_cross_entropy(self._tempered(h), self.embed.weight, targets, reduction, label_smoothing,
                                        self.loss_blocks)
        return F.cross_entropy(self.logits(h).flatten(0, 1).float(), targets.flatten(), reduction=reduction,
                               label_smoothing=label_smoothing)

    def _tempered(self, h: torch.Tensor) -> torch.Tensor:
        # without a softcap the head is linear: dividing its input divides the logits, at a vocabulary-th of the cost
        return h if self.config.temperature == 1 else h * (1 / self.config.temperature)

    def new_caches(self, batch: int, device: torch.device, dtype: torch.dtype | None = None) -> list[KVCache]:
        """Key/value caches for decoding, in `dtype` (default: the weights')."""
        c = self.config
        dtype = dtype or self.embed.weight.dtype
        return [KVCache(batch, c.n_head, c.context, c.d_model // c.n_head, device, dtype) for _ in range(c.n_layer)]
