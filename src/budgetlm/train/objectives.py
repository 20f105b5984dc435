"""Each architecture's pretraining objective as a loop task: next-token (GPT), masked tokens (BERT), corrupted
spans (T5); and what its validation reports."""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer

from budgetlm.data.tokenizer import (
    MASK,
    PAD,
    SENTINELS,
    eot_id,
    sentinel,
    special_tokens,
)
from budgetlm.models.config import ModelConfig
from budgetlm.models.registry import OBJECTIVES
from budgetlm.train.lm import LanguageModelTask
from budgetlm.train.mlm import MaskedLMTask
from budgetlm.train.span import SpanCorruptionTask

# the figure of each objective that a comparison ranks by, and the one it stops and keeps the best weights by
VALIDATION_METRICS = {"causal_lm": ("val_loss", "val_bpb", "val_ppl"),
                      "masked_lm": ("val_loss", "val_mlm_accuracy"),
                      "span_corruption": ("val_loss", "val_span_accuracy")}


def objective(arch: str) -> str:
    return OBJECTIVES[arch]


def pretraining_task(mc: ModelConfig, tokenizer: Tokenizer, train_tokens: np.ndarray, val_tokens: np.ndarray,
                     val_bytes: int, micro_batch: int, device: torch.device, *, seed: int, label_smoothing: float,
                     mask_rate: float):
    if mc.arch == "bert":
        # random replacements are ordinary tokens: the vocabulary before the added specials
        first_special = min(tokenizer.token_to_id(t) for t in special_tokens("bert"))
        return MaskedLMTask(train_tokens, val_tokens, mc.context, micro_batch, device, mask_rate=mask_rate,
                            mask_id=tokenizer.token_to_id(MASK), random_below=first_special,
                            keep=(eot_id(tokenizer),), seed=seed, label_smoothing=label_smoothing)
    if mc.arch == "t5":
        sentinels = np.array([tokenizer.token_to_id(sentinel(i)) for i in range(SENTINELS)], dtype=np.int64)
        return SpanCorruptionTask(train_tokens, val_tokens, mc.context, micro_batch, device, sentinels=sentinels,
                                  start_id=tokenizer.token_to_id(PAD), seed=seed, label_smoothing=label_smoothing)
    return LanguageModelTask(train_tokens, val_tokens, val_bytes, mc.context, micro_batch, device, seed,
                             label_smoothing=label_smoothing)
