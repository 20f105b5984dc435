"""BERT: a bidirectional Transformer encoder (Devlin et al. 2019) on the shared body, trained as a masked
language model: the loss reads only the masked positions, gathered before the (tied) output projection."""

from __future__ import annotations

import torch
from torch import nn

from budgetlm.models.base import LanguageModel, built_config
from budgetlm.models.blocks import Block, RMSNorm, Rotary, compute_dtype, init_weights
from budgetlm.models.config import ModelConfig

# The default share of masked tokens. Cramming (Geiping & Goldstein 2023) found about 0.25 better than BERT's 0.15
# under a small budget; on tinyshakespeare at 90 s (one seed, a loaded 2-core CPU) 0.25 scored 6.308 nats against
# 0.15's 6.345 on the same validation masks at 0.15 (docs/architectures.md)
MASK_RATE = 0.25


def key_padding_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(batch, time) with 1 on real tokens → an attention mask (batch, 1, 1, time) that hides padding keys."""
    return None if mask is None else mask.bool()[:, None, None, :]


class BERT(LanguageModel):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = built_config(config, "a BERT")
        if c.canon:
            raise ValueError("Canon mixes read earlier positions only; an encoder reads both ways (use --canon 0)")
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.drop = nn.Dropout(c.dropout) if c.dropout > 0 else nn.Identity()
        self.rotary = Rotary(c.head_dim, c.context, c.rope_base)
        self.blocks = nn.ModuleList(
            Block(c.d_model, c.n_head, c.mlp_hidden, causal=False, mlp=c.mlp, dropout=c.dropout,
                  attention_dropout=c.dropout if c.attention_dropout is None else c.attention_dropout,
                  qk_norm=c.qk_norm)
            for _ in range(c.n_layer)
        )
        self.norm = RMSNorm(c.d_model)
        init_weights(self, c.n_layer)

    def flops_per_token(self, mask_rate: float = MASK_RATE) -> float:
        """Training FLOPs per input token: 6·N of the body for every token, the tied head's 6·vocab·d_model
        only for the masked share, and attention over the whole window (no causal half)."""
        c = self.config
        head = c.vocab_size * c.d_model
        return 6 * (self.num_params() - head) + 6 * head * mask_rate + 12 * c.n_layer * c.d_model * c.context

    def hidden(self, idx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final normalized hidden states (batch, time, d_model); `mask` (batch, time) is 1 on real tokens
        of right-padded rows (None: all real)."""
        if idx.shape[1] > self.config.context:
            raise ValueError(f"sequence of {idx.shape[1]} tokens exceeds the context of {self.config.context}")
        x = self.drop(self.embed(idx))
        rope = self.rotary.tables(0, idx.shape[1], compute_dtype(x))
        attn_mask = key_padding_mask(mask)
        for block in self.blocks:
            x = block(x, mask=attn_mask, rope=rope)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, reduction: str = "mean",
                label_smoothing: float = 0.0, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, time, vocab) without targets; with targets (-100 where nothing is to be predicted),
        the cross-entropy of the other positions in nats (`reduction` as in F.cross_entropy, over them only)."""
        return self.head(self.hidden(idx, mask), targets, reduction=reduction, label_smoothing=label_smoothing)
