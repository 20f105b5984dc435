"""Language modelling as a task for the loop: next-token batches, summed cross-entropy, and
validation loss with bits per byte (total nats ÷ (UTF-8 bytes × ln 2), tokenizer-independent)."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from budgetlm.data.tokens import WindowSampler, eval_windows
from budgetlm.eval.calibration import Calibration, calibrate
from budgetlm.train.runtime import to_device


def evaluate_lm(forward: Callable, tokens: np.ndarray, n_bytes: int, context: int, batch: int,
                device: torch.device, max_batches: int | None = None) -> dict[str, float]:
    """Loss per token, bits per byte and perplexity over the stream (or its first batches; bpb
    then scales the bytes by the share of tokens seen)."""
    total_nats, total_tokens = sum_nats(forward, eval_windows(tokens, context, batch), device, max_batches)
    bytes_seen = n_bytes * total_tokens / (len(tokens) - 1)
    return lm_metrics(total_nats, total_tokens, bytes_seen)


def sum_nats(forward: Callable, batches, device: torch.device, max_batches: int | None = None) -> tuple[float, int]:
    """(summed nats, predicted tokens) over `batches` of (x, y). The sums stay on the device and are read every
    `HOST_READ_EVERY` batches, so a GPU is not made to wait after every batch, and memory stays bounded."""
    batch_nats, total_nats, total_tokens = [], 0.0, 0
    for i, (x, y) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        batch_nats.append(forward(to_device(x, device), to_device(y, device), reduction="sum").detach().float())
        total_tokens += int((y != -100).sum())
        if len(batch_nats) == HOST_READ_EVERY:
            total_nats += _host_sum(batch_nats)
            batch_nats = []
    return total_nats + _host_sum(batch_nats), total_tokens


HOST_READ_EVERY = 256


def _host_sum(values: list[torch.Tensor]) -> float:
    return float(torch.stack(values).cpu().double().sum()) if values else 0.0  # MPS has no float64


def lm_metrics(total_nats: float, total_tokens: int, n_bytes: float) -> dict[str, float]:
    loss = total_nats / max(total_tokens, 1)
    return {"val_loss": loss, "val_bpb": total_nats / (n_bytes * math.log(2)),
            "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": total_tokens}


class LanguageModelTask:
    unit = "tokens"

    def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, val_bytes: int, context: int,
                 micro_batch: int, device: torch.device, seed: int = 0, label_smoothing: float = 0.0):
        self.sampler = WindowSampler(train_tokens, context, micro_batch, seed)
        self.val_tokens, self.val_bytes = val_tokens, val_bytes
        self.context, self.micro_batch, self.device = context, micro_batch, device
        self.micro_steps = 1
        self.label_smoothing = label_smoothing
        self._eval_micro_batch = micro_batch  # evaluation keeps its batch shape (and compiled graph)

    def halve_micro_batch(self) -> bool:
        """After running out of memory: half the sequences per forward pass, twice the micro-steps.
        The sampler cuts the same windows either way, so the data order is unchanged."""
        if self.micro_batch < 2:
            return False
        self.micro_batch //= 2
        self.micro_steps *= 2
        self.sampler.batch = self.micro_batch
        return True

    def halve_eval_batch(self) -> bool:
        """After evaluation ran out of memory: half the sequences per forward pass (same numbers)."""
        if self._eval_micro_batch < 2:
            return False
        self._eval_micro_batch //= 2
        return True

    def batch(self, step: int, micro: int):
        return self.sampler.batch_at(step, micro, self.micro_steps)

    def count(self, batch) -> int:
        return batch[1].numel()

    def loss(self, forward: Callable, batch) -> torch.Tensor:
        x, y = batch
        return forward(x, y, reduction="sum", label_smoothing=self.label_smoothing)

    def eval_batch_count(self) -> int:
        return math.ceil(math.ceil((len(self.val_tokens) - 1) / self.context) / self._eval_micro_batch)

    def evaluate(self, forward: Callable, max_batches: int | None) -> dict[str, float]:
        return evaluate_lm(forward, self.val_tokens, self.val_bytes, self.context, self._eval_micro_batch,
                           self.device, max_batches)

    def calibrate(self, model) -> Calibration:
        """The temperature of `model` fitted on the validation stream (eval/calibration.py); under no_grad."""
        return calibrate(model, self.val_tokens, self.val_bytes, self.context, self._eval_micro_batch, self.device)
