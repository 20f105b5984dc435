"""Autoregressive sampling from a causal LM: temperature, top-k, nucleus (top-p), KV cache."""

from __future__ import annotations

from typing import Iterator

import torch


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
          generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (batch,) from last-position logits (batch, vocab)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token once the mass before it already reaches top_p (the first always stays)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _last_logits(model, ids: torch.Tensor, caches=None) -> torch.Tensor:
    """Logits of the last position only: the vocabulary projection of earlier positions is never used."""
    return model.logits(model.hidden(ids, caches)[:, -1])


@torch.inference_mode()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True, cache_dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
    """Yield one new token id per step (shape (batch,)) after the prompt (batch, time); the key/value
    cache holds `cache_dtype` (default: the weights')."""
    context = model.config.context
    seq = prompt[:, -context:]
    caches = None
    logits = None
    for _ in range(max_new_tokens):
        if not use_cache:
            logits = _last_logits(model, seq[:, -context:])
        elif caches is None or caches[0].length >= context:
            # (Re)fill the cache; when the window is full, keep its last half and go on from there.
            window = seq[:, -(context // 2):] if caches is not None else seq
            caches = model.new_caches(seq.shape[0], seq.device, cache_dtype)
            logits = _last_logits(model, window, caches)
        token = _pick(logits, temperature, top_k, top_p, generator)
        yield token
        seq = torch.cat([seq, token[:, None]], dim=1)[:, -context:]
        if use_cache and caches[0].length < context:
            logits = _last_logits(model, token[:, None], caches)


@torch.inference_mode()
def generate_seq2seq(model, src: torch.Tensor, start_id: int, max_new_tokens: int, *, temperature: float = 1.0,
                     top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                     use_cache: bool = True, cache_dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
    """Yield the decoder's tokens (batch,) one per step for the encoder input `src` (batch, time), starting from
    `start_id`. The encoder runs once; with the cache each step decodes one token, and the decoder's view of the
    encoder's output is projected at the first step only."""
    memory = model.encode(src)
    seq = torch.full((src.shape[0], 1), start_id, dtype=torch.long, device=src.device)
    caches = model.new_caches(src.shape[0], src.device, cache_dtype) if use_cache else None
    step_input = seq
    for _ in range(min(max_new_tokens, model.config.context - 1)):
        h = model.decode(step_input, memory, caches=caches) if use_cache else model.decode(seq, memory)
        token = _pick(model.logits(h[:, -1]), temperature, top_k, top_p, generator)
        yield token
        seq = torch.cat([seq, token[:, None]], dim=1)
        step_input = token[:, None]
