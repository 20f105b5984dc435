"""T5: an encoder-decoder Transformer (Raffel et al. 2020) on the shared body, trained by span corruption.
The encoder reads the corrupted text both ways; the decoder writes the dropped spans, attending to its own
past (causal) and to the encoder's output (cross-attention). Positions are rotary in both stacks (T5's own
relative position buckets are not used); input and output embeddings are one tied matrix."""

from __future__ import annotations

import torch
from torch import nn

from budgetlm.models.base import LanguageModel, built_config
from budgetlm.models.bert import key_padding_mask
from budgetlm.models.blocks import (
    Block,
    KVCache,
    RMSNorm,
    Rotary,
    compute_dtype,
    init_weights,
)
from budgetlm.models.config import ModelConfig

# T5's span corruption (Raffel et al. 2020, as nanoT5): 15% of the tokens dropped, in spans of 3 on average
NOISE_DENSITY = 0.15
MEAN_SPAN = 3.0


def encoder_decoder_flops(n_layer: int, d_model: int, vocab: int, context: int, mlp_ratio: float = 4.0,
                          noise: float = NOISE_DENSITY, mean_span: float = MEAN_SPAN) -> float:
    """Training FLOPs per token of raw text. Span corruption turns each raw token into `inputs` encoder tokens
    (the kept ones and a sentinel per span) and `targets` decoder tokens (the dropped ones and a sentinel per span):
    6 FLOPs per weight per token each stack reads (the decoder's cross-attention adds 4·d_model² weights per
    layer), attention over the encoder's window, the decoder's own and the decoder's reading of the encoder's, and
    the tied head for the decoder's tokens only. An encoder-decoder is not a decoder: its encoder pays no head."""
    spans = noise / mean_span
    inputs, targets = 1 - noise + spans, noise + spans
    layer = (4 + 2 * mlp_ratio) * d_model**2
    source, target = inputs * context, targets * context
    return (6 * n_layer * layer * inputs + 6 * n_layer * (layer + 4 * d_model**2) * targets
            + 6 * vocab * d_model * targets
            + 12 * n_layer * d_model * (source * inputs + target * targets + source * targets))


class T5(LanguageModel):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = built_config(config, "a T5")
        if c.canon:
            raise ValueError("Canon mixes are for decoder-only models here (use --canon 0)")
        attention_dropout = c.dropout if c.attention_dropout is None else c.attention_dropout

        def stack(decoder: bool) -> nn.ModuleList:
            return nn.ModuleList(
                Block(c.d_model, c.n_head, c.mlp_hidden, causal=decoder, mlp=c.mlp, dropout=c.dropout,
                      attention_dropout=attention_dropout, qk_norm=c.qk_norm, cross_attention=decoder)
                for _ in range(c.n_layer))

        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.drop = nn.Dropout(c.dropout) if c.dropout > 0 else nn.Identity()
        self.rotary = Rotary(c.head_dim, c.context, c.rope_base)
        self.encoder, self.encoder_norm = stack(False), RMSNorm(c.d_model)
        self.decoder, self.norm = stack(True), RMSNorm(c.d_model)
        init_weights(self, 2 * c.n_layer)

    def flops_per_token(self) -> float:
        """Training FLOPs per token of raw text (see `encoder_decoder_flops`)."""
        c = self.config
        return encoder_decoder_flops(c.n_layer, c.d_model, c.vocab_size, c.context, c.mlp_ratio)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output (batch, source time, d_model); `src_mask` is 1 on real tokens."""
        if src.shape[1] > self.config.context:
            raise ValueError(f"input of {src.shape[1]} tokens exceeds the context of {self.config.context}")
        x = self.drop(self.embed(src))
        rope = self.rotary.tables(0, src.shape[1], compute_dtype(x))
        attn_mask = key_padding_mask(src_mask)
        for block in self.encoder:
            x = block(x, mask=attn_mask, rope=rope)
        return self.encoder_norm(x)

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor | None = None,
               caches: list[KVCache] | None = None) -> torch.Tensor:
        """The decoder's final hidden states for the decoder inputs `tgt`; with caches, `tgt` continues the
        positions they hold, and the memory's projections are computed at the first call only."""
        x = self.drop(self.embed(tgt))
        offset = caches[0].length if caches is not None else 0
        rope = self.rotary.tables(offset, tgt.shape[1], compute_dtype(x))
        memory_mask = key_padding_mask(src_mask)
        for i, block in enumerate(self.decoder):
            x = block(x, memory=memory, memory_mask=memory_mask, cache=caches[i] if caches is not None else None,
                      rope=rope)
        return self.norm(x)

    def hidden(self, src: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output: what a classifier reads (models/classifier.py)."""
        return self.encode(src, mask)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, targets: torch.Tensor | None = None, *,
                reduction: str = "mean", label_smoothing: float = 0.0,
                src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder logits (batch, target time, vocab); with targets (-100: ignored), the cross-entropy in nats."""
        h = self.decode(tgt, self.encode(src, src_mask), src_mask)
        return self.head(h, targets, reduction=reduction, label_smoothing=label_smoothing)

    def new_caches(self, batch: int, device: torch.device, dtype: torch.dtype | None = None) -> list[KVCache]:
        c = self.config
        dtype = dtype or self.embed.weight.dtype
        return [KVCache(batch, c.n_head, c.context, c.head_dim, device, dtype) for _ in range(c.n_layer)]

